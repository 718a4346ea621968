//! The HTTP surface: the Confluent Schema Registry REST subset.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::compatibility::CompatibilityLevel;
use crate::error::RegistryError;
use crate::schema::{AVRO, SchemaReference};
use crate::store::{PgSchemaStore, SchemaSubmission, SubjectVersion, VersionSelector};

/// The content type of every registry response.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The `registry_config` key of the global level.
const GLOBAL: &str = "";

/// All registry routes, with `store` as their state.
pub fn router(store: PgSchemaStore) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/schemas/types", get(schema_types))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(schema_versions))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(list_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(get_version).delete(delete_version))
        .route("/subjects/{subject}/versions/{version}/schema", get(raw_schema_by_version))
        .route("/compatibility/subjects/{subject}/versions", post(test_against_all))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(test_against_version))
        .route("/config", get(get_global_config).put(put_global_config).delete(delete_global_config))
        .route("/config/{subject}", get(get_subject_config).put(put_subject_config).delete(delete_subject_config))
        .fallback(|| async { RegistryError::RouteNotFound })
        .method_not_allowed_fallback(|| async { RegistryError::MethodNotAllowed })
        .with_state(store)
}

/// Serializes `body` as a registry response.
pub(crate) fn registry_json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))], bytes).into_response(),
        Err(error) => RegistryError::Internal(Box::new(error)).into_response(),
    }
}

fn ok<T: Serialize>(body: &T) -> Response {
    registry_json(StatusCode::OK, body)
}

/// A JSON request body, accepted whatever its content type says (Confluent clients send
/// `application/vnd.schemaregistry.v1+json`, others `application/json`).
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = RegistryError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => RegistryError::PayloadTooLarge,
            _ => RegistryError::BadRequest(rejection.body_text()),
        })?;
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let value = T::deserialize(&mut deserializer).and_then(|value| deserializer.end().map(|()| value)).map_err(
            |error| {
                if error.is_data() {
                    RegistryError::UnprocessableEntity(format!("Unprocessable request body: {error}"))
                } else {
                    RegistryError::BadRequest(format!("Malformed JSON request body: {error}"))
                }
            },
        )?;
        Ok(Self(value))
    }
}

/// Path parameters, with Confluent-shaped rejections.
struct Params<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Params<T> {
    type Rejection = RegistryError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|rejection| RegistryError::BadRequest(rejection.body_text()))
    }
}

/// Query parameters, with Confluent-shaped rejections.
struct QueryParams<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = RegistryError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|rejection| RegistryError::BadRequest(rejection.body_text()))
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Flags {
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    permanent: bool,
    #[serde(default)]
    verbose: bool,
    #[serde(default)]
    default_to_global: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaRequest {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Option<Vec<SchemaReference>>,
}

impl From<SchemaRequest> for SchemaSubmission {
    fn from(request: SchemaRequest) -> Self {
        Self {
            text: request.schema,
            schema_type: request.schema_type,
            references: request.references.unwrap_or_default(),
        }
    }
}

#[derive(Serialize)]
struct IdResponse {
    id: i32,
}

/// `schemaType` and `references` are left out when they are `AVRO` and empty, as Confluent does.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SchemaResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_type: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    references: Vec<SchemaReference>,
    schema: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VersionResponse {
    subject: String,
    version: i32,
    id: i32,
    #[serde(flatten)]
    schema: SchemaResponse,
}

impl From<SubjectVersion> for VersionResponse {
    fn from(version: SubjectVersion) -> Self {
        Self {
            subject: version.subject,
            version: version.version,
            id: version.id,
            schema: schema_response(version.schema_type, version.schema, version.references),
        }
    }
}

fn schema_response(schema_type: String, schema: String, references: Vec<SchemaReference>) -> SchemaResponse {
    SchemaResponse { schema_type: (schema_type != AVRO).then_some(schema_type), references, schema }
}

#[derive(Serialize)]
struct SubjectVersionPair {
    subject: String,
    version: i32,
}

#[derive(Serialize)]
struct CompatibilityResponse {
    is_compatible: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<Vec<String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigResponse {
    compatibility_level: &'static str,
}

#[derive(Deserialize, Serialize)]
struct ConfigUpdate {
    compatibility: String,
}

type Outcome = Result<Response, RegistryError>;

fn parse_id(text: &str) -> Result<i32, RegistryError> {
    text.parse::<i32>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| RegistryError::SchemaNotFound(format!("Schema {text} not found")))
}

async fn root() -> Response {
    ok(&serde_json::json!({}))
}

async fn schema_types() -> Response {
    ok(&[AVRO])
}

async fn schema_by_id(State(store): State<PgSchemaStore>, Params(id): Params<String>) -> Outcome {
    let stored = store.schema_by_id(parse_id(&id)?).await?;
    Ok(ok(&schema_response(stored.schema_type, stored.schema, stored.references)))
}

async fn raw_schema_by_id(State(store): State<PgSchemaStore>, Params(id): Params<String>) -> Outcome {
    let stored = store.schema_by_id(parse_id(&id)?).await?;
    Ok(raw_schema(stored.schema))
}

async fn schema_versions(
    State(store): State<PgSchemaStore>,
    Params(id): Params<String>,
    QueryParams(flags): QueryParams<Flags>,
) -> Outcome {
    let usages = store.schema_usages(parse_id(&id)?, flags.deleted).await?;
    let pairs: Vec<SubjectVersionPair> =
        usages.into_iter().map(|(subject, version)| SubjectVersionPair { subject, version }).collect();
    Ok(ok(&pairs))
}

async fn list_subjects(State(store): State<PgSchemaStore>, QueryParams(flags): QueryParams<Flags>) -> Outcome {
    Ok(ok(&store.subjects(flags.deleted).await?))
}

async fn list_versions(
    State(store): State<PgSchemaStore>,
    Params(subject): Params<String>,
    QueryParams(flags): QueryParams<Flags>,
) -> Outcome {
    Ok(ok(&store.versions(&subject, flags.deleted).await?))
}

async fn register(
    State(store): State<PgSchemaStore>,
    Params(subject): Params<String>,
    Body(request): Body<SchemaRequest>,
) -> Outcome {
    let id = store.register(&subject, request.into()).await?;
    Ok(ok(&IdResponse { id }))
}

async fn lookup(
    State(store): State<PgSchemaStore>,
    Params(subject): Params<String>,
    QueryParams(flags): QueryParams<Flags>,
    Body(request): Body<SchemaRequest>,
) -> Outcome {
    let found = store.lookup(&subject, request.into(), flags.deleted).await?;
    Ok(ok(&VersionResponse::from(found)))
}

async fn delete_subject(
    State(store): State<PgSchemaStore>,
    Params(subject): Params<String>,
    QueryParams(flags): QueryParams<Flags>,
) -> Outcome {
    Ok(ok(&store.delete_subject(&subject, flags.permanent).await?))
}

async fn get_version(
    State(store): State<PgSchemaStore>,
    Params((subject, version)): Params<(String, String)>,
    QueryParams(flags): QueryParams<Flags>,
) -> Outcome {
    let selector = VersionSelector::parse(&version)?;
    let found = store.version(&subject, selector, flags.deleted).await?;
    Ok(ok(&VersionResponse::from(found)))
}

async fn raw_schema_by_version(
    State(store): State<PgSchemaStore>,
    Params((subject, version)): Params<(String, String)>,
    QueryParams(flags): QueryParams<Flags>,
) -> Outcome {
    let selector = VersionSelector::parse(&version)?;
    let found = store.version(&subject, selector, flags.deleted).await?;
    Ok(raw_schema(found.schema))
}

/// The schema itself as the body (it is JSON already).
fn raw_schema(schema: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))], schema).into_response()
}

async fn delete_version(
    State(store): State<PgSchemaStore>,
    Params((subject, version)): Params<(String, String)>,
    QueryParams(flags): QueryParams<Flags>,
) -> Outcome {
    let selector = VersionSelector::parse(&version)?;
    let deleted = store.delete_version(&subject, selector, flags.permanent).await?;
    Ok(ok(&deleted))
}

async fn test_against_all(
    State(store): State<PgSchemaStore>,
    Params(subject): Params<String>,
    QueryParams(flags): QueryParams<Flags>,
    Body(request): Body<SchemaRequest>,
) -> Outcome {
    let messages = store.test_compatibility(&subject, None, request.into()).await?;
    Ok(compatibility_response(messages, flags.verbose))
}

async fn test_against_version(
    State(store): State<PgSchemaStore>,
    Params((subject, version)): Params<(String, String)>,
    QueryParams(flags): QueryParams<Flags>,
    Body(request): Body<SchemaRequest>,
) -> Outcome {
    let selector = VersionSelector::parse(&version)?;
    let messages = store.test_compatibility(&subject, Some(selector), request.into()).await?;
    Ok(compatibility_response(messages, flags.verbose))
}

fn compatibility_response(messages: Vec<String>, verbose: bool) -> Response {
    ok(&CompatibilityResponse { is_compatible: messages.is_empty(), messages: verbose.then_some(messages) })
}

fn config_response(level: CompatibilityLevel) -> Response {
    ok(&ConfigResponse { compatibility_level: level.as_str() })
}

async fn put_config(store: &PgSchemaStore, scope: &str, update: ConfigUpdate) -> Outcome {
    let level = CompatibilityLevel::parse(&update.compatibility)
        .ok_or(RegistryError::InvalidCompatibilityLevel(update.compatibility))?;
    store.set_level(scope, level).await?;
    Ok(ok(&ConfigUpdate { compatibility: level.as_str().to_owned() }))
}

async fn get_global_config(State(store): State<PgSchemaStore>) -> Outcome {
    let level = store.configured_level(GLOBAL).await?;
    Ok(config_response(level.unwrap_or(CompatibilityLevel::DEFAULT)))
}

async fn put_global_config(State(store): State<PgSchemaStore>, Body(update): Body<ConfigUpdate>) -> Outcome {
    put_config(&store, GLOBAL, update).await
}

async fn delete_global_config(State(store): State<PgSchemaStore>) -> Outcome {
    let previous = store.delete_level(GLOBAL).await?;
    Ok(config_response(previous.unwrap_or(CompatibilityLevel::DEFAULT)))
}

async fn get_subject_config(
    State(store): State<PgSchemaStore>,
    Params(subject): Params<String>,
    QueryParams(flags): QueryParams<Flags>,
) -> Outcome {
    match store.configured_level(&subject).await? {
        Some(level) => Ok(config_response(level)),
        None if flags.default_to_global => {
            let level = store.configured_level(GLOBAL).await?;
            Ok(config_response(level.unwrap_or(CompatibilityLevel::DEFAULT)))
        }
        None => Err(RegistryError::SubjectConfigNotFound(subject)),
    }
}

async fn put_subject_config(
    State(store): State<PgSchemaStore>,
    Params(subject): Params<String>,
    Body(update): Body<ConfigUpdate>,
) -> Outcome {
    put_config(&store, &subject, update).await
}

async fn delete_subject_config(State(store): State<PgSchemaStore>, Params(subject): Params<String>) -> Outcome {
    match store.delete_level(&subject).await? {
        Some(previous) => Ok(config_response(previous)),
        None => Err(RegistryError::SubjectConfigNotFound(subject)),
    }
}
