//! The OpenAPI 3.1 document of the HTTP API, made from a route table ([`crate::routes`]), so it
//! lists exactly the routes the gateway serves and who may call them. The gateway builds it once
//! at start and serves it at `GET /openapi.json`.

use serde_json::{Map, Value, json};

use crate::{routes::RouteSpec, security::Access};

/// The document of `routes`.
pub fn build(routes: &[RouteSpec]) -> Value {
    let mut paths = Map::new();
    for route in routes {
        let mut operation = Map::new();
        operation.insert("tags".into(), json!([route.tag]));
        operation.insert("summary".into(), json!(route.summary));
        operation.insert("operationId".into(), json!(format!("{} {}", route.method, route.path)));
        let mut parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if route.tag == "streams" {
            parameters.extend(stream_parameters());
        }
        if !parameters.is_empty() {
            operation.insert("parameters".into(), json!(parameters));
        }
        let (description, security) = match route.access {
            Access::Public => ("Anyone.".to_owned(), json!([{}, {"bearer": []}])),
            Access::Authenticated => ("Any signed-in user.".to_owned(), json!([{"bearer": []}])),
            Access::Permission { action, .. } => (format!("Needs the permission `{action}`."), json!([{"bearer": []}])),
        };
        operation.insert("description".into(), json!(description));
        operation.insert("security".into(), security);
        if let Some(schema) = route.request {
            operation.insert(
                "requestBody".into(),
                json!({"required": true, "content": {"application/json": {"schema": reference(schema)}}}),
            );
        }
        let (status, schema) = route.response;
        let mut responses = Map::new();
        let success = match schema {
            Some(schema) => {
                json!({"description": "Success", "content": {media_type(schema): {"schema": reference(schema)}}})
            }
            None => json!({"description": "Success"}),
        };
        responses.insert(status.to_string(), success);
        responses.insert("default".into(), json!({"$ref": "#/components/responses/Problem"}));
        operation.insert("responses".into(), Value::Object(responses));
        let item = paths.entry(route.path.to_owned()).or_insert_with(|| json!({}));
        item[route.method.as_str().to_lowercase()] = Value::Object(operation);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Keel",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Keel's HTTP API. Commands answer with `ETag` (the aggregate's version) and \
                `Keel-Position` (a consistency token); queries accept `Keel-Consistency` and answer \
                `Keel-Stale`. `Idempotency-Key` makes a command safe to retry. Every error is \
                application/problem+json (RFC 9457).",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (EdDSA)"}},
            "responses": {"Problem": {
                "description": "A problem (RFC 9457)",
                "content": {"application/problem+json": {"schema": reference("Problem")}},
            }},
            "schemas": schemas(),
        },
    })
}

/// The media type of a response schema: JSON, but for event streams and key sets (RFC 7517's
/// registered type, which the handler sends).
fn media_type(schema: &str) -> &'static str {
    match schema {
        "EventStream" => "text/event-stream",
        "Jwks" => "application/jwk-set+json",
        _ => "application/json",
    }
}

fn stream_parameters() -> Vec<Value> {
    vec![
        json!({"name": "from", "in": "query", "schema": {"type": "string"},
            "description": "`latest` (default), `earliest`, an RFC 3339 time, or a cursor (an event's `id`)."}),
        json!({"name": "type", "in": "query", "schema": {"type": "string"},
            "description": "Only these event types, comma-separated (`PostPublished,PostDrafted`)."}),
        json!({"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
            "description": "Resume exactly after this event (what browsers send when they reconnect); wins over `from`."}),
    ]
}

fn reference(schema: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{schema}")})
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "required": required, "properties": properties, "additionalProperties": false})
}

fn page(item: &str) -> Value {
    object(
        &["items", "next_cursor"],
        json!({"items": {"type": "array", "items": reference(item)}, "next_cursor": {"type": ["string", "null"]}}),
    )
}

fn schemas() -> Value {
    let string = json!({"type": "string"});
    let uuid = json!({"type": "string", "format": "uuid"});
    let time = json!({"type": "string", "format": "date-time"});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    let author = object(&["id", "display_name"], json!({"id": uuid, "display_name": {"type": ["string", "null"]}}));
    json!({
        "Problem": {"type": "object", "required": ["type", "title", "status"], "properties": {
            "type": string, "title": string, "status": {"type": "integer"}, "detail": string,
            "trace_id": string,
        }},
        "Registration": object(&["email", "display_name", "password"], json!({
            "email": {"type": "string", "format": "email"},
            "display_name": {"type": "string", "maxLength": 100},
            "password": {"type": "string", "minLength": 10, "maxLength": 128},
        })),
        "ProfileUpdate": object(&[], json!({"display_name": string, "bio": {"type": "string", "maxLength": 500}})),
        "EmailChange": object(&["email"], json!({"email": {"type": "string", "format": "email"}})),
        "User": object(&["id", "email", "display_name", "bio", "status", "version"], json!({
            "id": uuid, "email": {"type": ["string", "null"]}, "display_name": {"type": ["string", "null"]},
            "bio": string, "status": {"enum": ["active", "deactivated", "erased"]}, "version": {"type": "integer"},
        })),
        "CommandResult": object(&["id", "version", "position"], json!({
            "id": string, "version": {"type": "integer"},
            "position": {"oneOf": [{"type": "null"}, object(&["topic", "partition", "offset"], json!({
                "topic": string, "partition": {"type": "integer"}, "offset": {"type": "integer"},
            }))]},
        })),
        "Login": object(&["email", "password"], json!({"email": string, "password": string})),
        "Refresh": object(&["refresh_token"], json!({"refresh_token": string})),
        "Tokens": object(&["access_token", "token_type", "expires_in", "refresh_token", "refresh_expires_at", "user_id", "session_id"], json!({
            "access_token": string, "token_type": {"const": "Bearer"}, "expires_in": {"type": "integer"},
            "refresh_token": string, "refresh_expires_at": {"type": "integer"}, "user_id": uuid, "session_id": uuid,
        })),
        "Jwks": {"type": "object", "required": ["keys"], "properties": {"keys": {"type": "array", "items": {"type": "object"}}}},
        "Role": object(&["name", "permissions"], json!({"name": string, "permissions": strings})),
        "RolePermissions": object(&["permissions"], json!({"permissions": strings})),
        "RoleGrant": object(&["role"], json!({"role": string})),
        "RoleList": object(&["items"], json!({"items": {"type": "array", "items": object(&["id", "name", "permissions", "version"], json!({
            "id": uuid, "name": string, "permissions": strings, "version": {"type": "integer"},
        }))}})),
        "Draft": object(&["title"], json!({"title": {"type": "string", "maxLength": 200}, "body": string, "tags": strings})),
        "PostEdit": object(&[], json!({"title": string, "body": string, "tags": strings})),
        "Post": object(&["id", "author", "title", "body", "tags", "status", "version", "created_at", "updated_at", "published_at"], json!({
            "id": uuid, "author": author, "title": string, "body": string, "tags": strings,
            "status": {"enum": ["draft", "published"]}, "version": {"type": "integer"},
            "created_at": time, "updated_at": time, "published_at": {"type": ["string", "null"], "format": "date-time"},
        })),
        "PostItem": object(&["id", "author", "title", "excerpt", "tags", "status", "version", "updated_at", "published_at"], json!({
            "id": uuid, "author": author, "title": string, "excerpt": string, "tags": strings,
            "status": {"enum": ["draft", "published"]}, "version": {"type": "integer"},
            "updated_at": time, "published_at": {"type": ["string", "null"], "format": "date-time"},
        })),
        "PostPage": page("PostItem"),
        "Comment": object(&["body"], json!({"body": {"type": "string", "maxLength": 5000}})),
        "CommentItem": object(&["id", "post_id", "author", "body", "created_at"], json!({
            "id": uuid, "post_id": uuid, "author": author, "body": string, "created_at": time,
        })),
        "CommentPage": page("CommentItem"),
        "EventStream": {"type": "string", "description": "Server-Sent Events. Each event's `data` is a \
            StreamEvent as JSON and its `id` the cursor to resume after it; a final `lagged` (the client fell \
            behind) or `end` (shutdown, token expiry, session ended) event carries `{reason, resume}`. \
            Heartbeats are comments.", "x-keel-event": reference("StreamEvent")},
        "StreamEvent": object(&["topic", "partition", "offset", "event_index", "event_id", "event_type", "schema_version",
            "aggregate_id", "aggregate_version", "command_id", "actor", "occurred_at", "correlation_id", "trace_id", "payload"], json!({
            "topic": string, "partition": {"type": "integer"}, "offset": {"type": "integer"}, "event_index": {"type": "integer"},
            "event_id": uuid, "event_type": string, "schema_version": {"type": "integer"}, "aggregate_id": uuid,
            "aggregate_version": {"type": "integer"}, "command_id": uuid, "actor": string, "occurred_at": time,
            "correlation_id": uuid, "trace_id": {"type": ["string", "null"]},
            "payload": {"type": "object", "description": "The event's fields; sensitive ones are \"[redacted]\"."},
        })),
        "ProjectionStatusList": {"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": {
            "type": "object", "required": ["name", "code_version", "live_version", "needs_rebuild", "unresolved_dead_letters", "versions"],
        }}}},
        "AuditPage": {"type": "object", "required": ["items", "next_cursor"], "properties": {
            "items": {"type": "array", "items": {"type": "object"}}, "next_cursor": {"type": ["string", "null"]},
        }},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::ROUTES;

    #[test]
    fn every_route_is_documented_and_every_schema_it_names_exists() {
        let document = build(ROUTES);
        let schemas = document["components"]["schemas"].as_object().unwrap();
        for route in ROUTES {
            let operation = &document["paths"][route.path][route.method.as_str().to_lowercase()];
            assert!(operation.is_object(), "{} {} is missing", route.method, route.path);
            for name in route.request.iter().chain(route.response.1.iter()) {
                assert!(schemas.contains_key(*name), "schema {name} of {} {}", route.method, route.path);
            }
        }
        let text = document.to_string();
        for reference in text.split("#/components/schemas/").skip(1) {
            let name: String = reference.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
            assert!(schemas.contains_key(&name), "dangling reference to {name}");
        }
    }
}
