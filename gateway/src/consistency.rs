//! Read-your-writes: a query may carry the consistency tokens of the commands it must see.
//!
//! A command response carries `Keel-Position: <topic>/<partition>/<offset>`. A query route sent
//! with `Keel-Consistency: <token>[, <token>…]` waits until the live version of the projection
//! behind it has applied every named offset (its checkpoint has passed it), for at most
//! `gateway.consistency_timeout_ms`. Then it answers as usual. If the wait times out, it answers
//! with the data it has, with the same status it would give otherwise, and says so in
//! `Keel-Stale: true`. A fresh answer to a query with tokens carries `Keel-Stale: false`.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::problem::Problem;

pub(crate) const KEEL_CONSISTENCY: HeaderName = HeaderName::from_static("keel-consistency");
pub(crate) const KEEL_STALE: HeaderName = HeaderName::from_static("keel-stale");

/// A position in the log a read must have seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Whether an answer reflects every token it was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// No tokens were given.
    Unconstrained,
    Fresh,
    Stale,
}

impl Freshness {
    /// The `Keel-Stale` header of an answer, if the query asked for consistency.
    pub(crate) fn header(self) -> Option<(HeaderName, HeaderValue)> {
        match self {
            Self::Unconstrained => None,
            Self::Fresh => Some((KEEL_STALE, HeaderValue::from_static("false"))),
            Self::Stale => Some((KEEL_STALE, HeaderValue::from_static("true"))),
        }
    }
}

/// The tokens of a request, each on one of `topics` (the ones the route's projection reads).
pub(crate) fn tokens(headers: &HeaderMap, topics: &[&str]) -> Result<Vec<Token>, Problem> {
    let mut tokens = Vec::new();
    for value in headers.get_all(&KEEL_CONSISTENCY) {
        let text = value.to_str().map_err(|_| invalid("must be visible ASCII"))?;
        for item in text.split(',').map(str::trim).filter(|item| !item.is_empty()) {
            let token = parse(item).ok_or_else(|| invalid("each token must be <topic>/<partition>/<offset>"))?;
            if !topics.contains(&token.topic.as_str()) {
                return Err(invalid(&format!("this route does not read topic `{}`", token.topic)));
            }
            tokens.push(token);
        }
    }
    if tokens.len() > 64 {
        return Err(invalid("at most 64 tokens"));
    }
    Ok(tokens)
}

fn parse(item: &str) -> Option<Token> {
    let mut parts = item.rsplitn(3, '/');
    let offset = parts.next()?.parse().ok().filter(|offset: &i64| *offset >= 0)?;
    let partition = parts.next()?.parse().ok().filter(|partition: &i32| *partition >= 0)?;
    let topic = parts.next().filter(|topic| !topic.is_empty())?;
    Some(Token { topic: topic.to_owned(), partition, offset })
}

fn invalid(reason: &str) -> Problem {
    Problem::bad_request(format!("Keel-Consistency: {reason}"))
}

/// Waits until the live version of `projection` has applied every token, for at most `timeout`.
pub(crate) async fn wait(
    pool: &PgPool,
    projection: &str,
    tokens: &[Token],
    timeout: Duration,
) -> Result<Freshness, Problem> {
    if tokens.is_empty() {
        return Ok(Freshness::Unconstrained);
    }
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if passed(pool, projection, tokens).await? {
            return Ok(Freshness::Fresh);
        }
        let now = Instant::now();
        if now >= deadline {
            metrics::counter!("keel_gateway_stale_reads_total", "projection" => projection.to_owned()).increment(1);
            return Ok(Freshness::Stale);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// Whether every token lies before the live version's checkpoint of its partition.
async fn passed(pool: &PgPool, projection: &str, tokens: &[Token]) -> Result<bool, Problem> {
    let records: Vec<(String, i32, i64)> =
        tokens.iter().map(|token| (token.topic.clone(), token.partition, token.offset)).collect();
    let behind = keel_projections::unapplied(pool, projection, &records).await.map_err(|error| {
        tracing::error!(%error, "failed to read projection checkpoints");
        Problem::from_code(keel_proto::ErrorCode::Unavailable)
    })?;
    Ok(behind == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(KEEL_CONSISTENCY, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn tokens_are_positions_of_the_routes_topics() {
        let tokens = tokens(&headers("identity.users/3/17, identity.users/0/2"), &["identity.users"]).unwrap();
        assert_eq!(tokens[0], Token { topic: "identity.users".into(), partition: 3, offset: 17 });
        assert_eq!(tokens.len(), 2);
        assert!(super::tokens(&HeaderMap::new(), &["identity.users"]).unwrap().is_empty());
        for bad in ["identity.users/3", "identity.users/x/1", "identity.users/1/-1", "/1/2", "blog.posts/1/2"] {
            let problem = super::tokens(&headers(bad), &["identity.users"]).unwrap_err();
            assert_eq!(problem.status, 400, "{bad}");
        }
    }
}
