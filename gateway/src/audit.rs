//! `GET /v1/audit`: the audit log, filtered, in a stable order, one page at a time.
//!
//! Entries come in `(occurred_at, topic, partition, offset, event_index)` order, which is total
//! (the last four are the primary key), so keyset pagination never skips or repeats an entry,
//! even while the projector appends. The cursor is the sort key of a page's last entry, as
//! base64url JSON: opaque to clients, meaningful only to this route.

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use keel_read_models::audit::{self, AuditEntry};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    AppState, consistency,
    pagination::{self, Page, decode_cursor},
    problem::Problem,
};

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;
const PARAMETERS: &[&str] = &["actor", "aggregate", "event_type", "from", "to", "limit", "cursor"];

/// The parsed query string.
#[derive(Debug, Clone, PartialEq)]
struct AuditQuery {
    actor: Option<String>,
    aggregate: Option<Uuid>,
    event_type: Option<String>,
    /// Inclusive, on `occurred_at`.
    from: Option<DateTime<Utc>>,
    /// Exclusive, on `occurred_at`.
    to: Option<DateTime<Utc>>,
    limit: i64,
    /// Entries strictly after this one.
    after: Option<SortKey>,
}

/// Where an entry is in the route's order; the cursor's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SortKey {
    /// `occurred_at` in microseconds since the epoch: PostgreSQL's precision, so exact.
    occurred_at_us: i64,
    topic: String,
    partition: i32,
    offset: i64,
    event_index: i32,
}

/// `GET /v1/audit?actor=&aggregate=&event_type=&from=&to=&limit=&cursor=`
pub(crate) async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(pairs) = query.map_err(|_| Problem::bad_request("the query string is malformed"))?;
    let query = AuditQuery::parse(pairs)?;
    // The audit log reads every topic: a token of any is one to wait for.
    let topics: Vec<String> = keel_topics::Topic::ALL.iter().map(|topic| state.names.name(*topic)).collect();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let tokens = consistency::tokens(&headers, &topics)?;
    let freshness = consistency::wait(&state.pool, "audit", &tokens, state.consistency_timeout).await?;
    let mut response = page(&state, &query).await?.into_response();
    if let Some((name, value)) = freshness.header() {
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

/// One page of entries matching `query`.
async fn page(state: &AppState, query: &AuditQuery) -> Result<Json<Page<AuditEntry>>, Problem> {
    let items = fetch(state, query).await.map_err(|error| {
        tracing::error!(error = %error, "failed to read the audit log");
        Problem::from_code(keel_proto::ErrorCode::Unavailable)
    })?;
    Ok(Json(Page::of(items, query.limit, SortKey::of)))
}

impl AuditQuery {
    /// Every parameter checked, each error naming its parameter. An empty value is no filter.
    fn parse(pairs: Vec<(String, String)>) -> Result<Self, Problem> {
        let params = pagination::params(pairs, PARAMETERS)?;
        let aggregate = params
            .get("aggregate")
            .map(|value| {
                Uuid::parse_str(value).map_err(|_| Problem::bad_request("parameter `aggregate` must be a UUID"))
            })
            .transpose()?;
        let query = Self {
            actor: params.get("actor").cloned(),
            aggregate,
            event_type: params.get("event_type").cloned(),
            from: params.get("from").map(|value| parse_time("from", value)).transpose()?,
            to: params.get("to").map(|value| parse_time("to", value)).transpose()?,
            limit: pagination::limit(&params, DEFAULT_LIMIT, MAX_LIMIT)?,
            after: params
                .get("cursor")
                .map(|value| {
                    decode_cursor::<SortKey>(value)
                        .ok()
                        .filter(|key| DateTime::from_timestamp_micros(key.occurred_at_us).is_some())
                        .ok_or_else(|| Problem::bad_request("parameter `cursor` is not a cursor this route returned"))
                })
                .transpose()?,
        };
        if let (Some(from), Some(to)) = (query.from, query.to)
            && from > to
        {
            return Err(Problem::bad_request("parameter `from` must not be after `to`"));
        }
        Ok(query)
    }
}

/// An RFC 3339 time. A `+` of an offset that was not percent-encoded arrives as a space, which
/// is put back.
fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, Problem> {
    let repaired = value.rsplit_once(' ').map(|(time, offset)| format!("{time}+{offset}"));
    std::iter::once(value.to_owned())
        .chain(repaired)
        .find_map(|text| DateTime::parse_from_rfc3339(&text).ok())
        .map(|time| time.with_timezone(&Utc))
        .ok_or_else(|| {
            Problem::bad_request(format!("parameter `{name}` must be an RFC 3339 time such as 2026-11-25T10:00:00Z"))
        })
}

/// The page, plus one entry if there is one.
#[tracing::instrument(skip_all, fields(limit = query.limit))]
async fn fetch(state: &AppState, query: &AuditQuery) -> Result<Vec<AuditEntry>, sqlx::Error> {
    let filter = audit::Filter {
        actor: query.actor.clone(),
        aggregate: query.aggregate,
        event_type: query.event_type.clone(),
        from: query.from,
        to: query.to,
    };
    let after = query.after.as_ref().map(|key| audit::Place {
        occurred_at: key.occurred_at(),
        topic: key.topic.clone(),
        partition: key.partition,
        offset: key.offset,
        event_index: key.event_index,
    });
    audit::entries(&state.pool, &filter, after.as_ref(), query.limit + 1).await
}

impl SortKey {
    fn of(item: &AuditEntry) -> Self {
        Self {
            occurred_at_us: item.occurred_at.timestamp_micros(),
            topic: item.topic.clone(),
            partition: item.partition,
            offset: item.offset,
            event_index: item.event_index,
        }
    }

    fn occurred_at(&self) -> DateTime<Utc> {
        // Checked when the cursor was decoded.
        DateTime::from_timestamp_micros(self.occurred_at_us).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<AuditQuery, Problem> {
        let pairs = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').map_or((pair.to_owned(), String::new()), |(k, v)| (k.into(), v.into())))
            .collect();
        AuditQuery::parse(pairs)
    }

    fn detail(result: Result<AuditQuery, Problem>) -> String {
        let problem = result.unwrap_err();
        assert_eq!(problem.status, 400);
        problem.detail.unwrap()
    }

    #[test]
    fn parameters_are_parsed_and_errors_name_them() {
        let query = parse("actor=anonymous&aggregate=0193a6c2-7f5e-7d43-9a1b-2c3d4e5f6a7b&from=2026-11-25T10:00:00Z&to=2026-11-25T11:00:00 01:00&limit=3&event_type=").unwrap();
        assert_eq!(query.actor.as_deref(), Some("anonymous"));
        assert!(query.aggregate.is_some());
        assert_eq!(query.event_type, None);
        assert_eq!(query.from, query.to, "a `+` decoded as a space is repaired");
        assert_eq!(query.limit, 3);
        assert_eq!(parse("").unwrap().limit, DEFAULT_LIMIT);

        assert!(detail(parse("aggregate=nope")).contains("`aggregate`"));
        assert!(detail(parse("from=yesterday")).contains("`from`"));
        assert!(detail(parse("limit=0")).contains("`limit`"));
        assert!(detail(parse("limit=501")).contains("`limit`"));
        assert!(detail(parse("limit=ten")).contains("`limit`"));
        assert!(detail(parse("cursor=%%")).contains("`cursor`"));
        assert!(detail(parse("actor=a&actor=b")).contains("`actor`"));
        assert!(detail(parse("agregate=x")).contains("`agregate`"));
        assert!(detail(parse("from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z")).contains("`from`"));
    }
}
