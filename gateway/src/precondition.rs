//! Aggregate versions as HTTP entity tags: `ETag` on reads and command replies, `If-Match` on
//! commands that change an aggregate (optimistic concurrency).
//!
//! The entity tag of an aggregate is its version in decimal, quoted: `"3"`. The command service
//! compares versions itself, so the gateway only translates the header into an expected version.

use axum::http::{HeaderMap, HeaderValue, header};

/// An `If-Match` that is not one entity tag of Keel's form (a bad request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MalformedIfMatch;

impl MalformedIfMatch {
    pub(crate) const DETAIL: &'static str = "If-Match must be an entity tag such as \"3\"";
}

/// The strong entity tag of an aggregate version.
pub(crate) fn entity_tag(version: i64) -> HeaderValue {
    HeaderValue::try_from(format!("\"{version}\"")).expect("a quoted integer is a valid header value")
}

/// The version a request's `If-Match` expects, or `None` when the request is unconditional (no
/// header, or `*`).
///
/// A weak tag (`W/"3"`) is accepted like a strong one: versions are the only validators the
/// gateway hands out, and a proxy may have weakened one on its way back.
pub(crate) fn expected_version(headers: &HeaderMap) -> Result<Option<i64>, MalformedIfMatch> {
    let mut values = headers.get_all(header::IF_MATCH).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(MalformedIfMatch);
    }
    let text = value.to_str().map_err(|_| MalformedIfMatch)?.trim();
    if text == "*" {
        return Ok(None);
    }
    let quoted = text.strip_prefix("W/").unwrap_or(text);
    let digits = quoted.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')).ok_or(MalformedIfMatch)?;
    // `parse` alone would also take a sign; a version is plain digits.
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(MalformedIfMatch);
    }
    digits.parse().map(Some).map_err(|_| MalformedIfMatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::Problem;

    fn parse(values: &[&str]) -> Result<Option<i64>, Problem> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::IF_MATCH, HeaderValue::from_str(value).unwrap());
        }
        Ok(expected_version(&headers)?)
    }

    #[test]
    fn entity_tags_expect_their_version() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["*"]).unwrap(), None);
        assert_eq!(parse(&["\"3\""]).unwrap(), Some(3));
        assert_eq!(parse(&[" \"0\" "]).unwrap(), Some(0));
        assert_eq!(parse(&["W/\"17\""]).unwrap(), Some(17));
        assert_eq!(parse(&[&format!("\"{}\"", i64::MAX)]).unwrap(), Some(i64::MAX));
    }

    #[test]
    fn anything_else_is_a_bad_request_that_shows_the_form() {
        for value in [
            "3",
            "\"\"",
            "\"-1\"",
            "\"+3\"",
            "\"3",
            "w/\"3\"",
            "\"abc\"",
            "\"1\", \"2\"",
            "\"9223372036854775808\"",
            "**",
        ] {
            let problem = parse(&[value]).unwrap_err();
            assert_eq!(problem.status, 400, "{value}");
            assert_eq!(problem.detail.as_deref(), Some("If-Match must be an entity tag such as \"3\""));
        }
        assert_eq!(parse(&["\"1\"", "\"1\""]).unwrap_err().status, 400);
    }

    #[test]
    fn entity_tags_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert(header::IF_MATCH, entity_tag(42));
        assert_eq!(expected_version(&headers).unwrap(), Some(42));
        assert_eq!(entity_tag(42), "\"42\"");
    }
}
