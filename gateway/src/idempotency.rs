//! Command ids, and the `Idempotency-Key` request header that makes them repeatable.
//!
//! A command service applies a command id at most once and answers a repeat with the first
//! result. A client that retries a request with the same `Idempotency-Key` therefore gets the
//! same command id, derived from the key and everything that scopes it, and so the first result
//! instead of a second effect. Without the header every request is a new command.

use axum::http::{HeaderMap, HeaderName};
use uuid::Uuid;

use crate::problem::Problem;

/// The request header a client sets to make a command request safe to retry.
pub(crate) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header that says the command had been applied before and this is its first
/// result.
pub(crate) const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

const MAX_KEY_LENGTH: usize = 255;
/// The UUID v5 namespace of these ids, so they collide with no other name-based id: itself the
/// v5 id of `urn:keel:gateway:idempotency` in the URL namespace. Changing it changes every id.
const NAMESPACE: Uuid = Uuid::from_u128(0x99207245_41de_5a2d_abde_f3067dfd875f);

/// What a command is, for deriving its id from an idempotency key: the same key on another route,
/// aggregate or actor is another command.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CommandScope<'a> {
    pub(crate) method: &'a str,
    /// The route template, e.g. `/v1/users/{id}`: the same for every request of the route.
    pub(crate) route: &'a str,
    /// The aggregate the command targets; empty when the command creates it.
    pub(crate) aggregate: &'a str,
    pub(crate) actor: &'a str,
}

/// The command id of a request: derived from its `Idempotency-Key` when it has one, else new.
pub(crate) fn command_id(headers: &HeaderMap, scope: CommandScope<'_>) -> Result<Uuid, Problem> {
    let mut keys = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(key) = keys.next() else {
        return Ok(Uuid::now_v7());
    };
    if keys.next().is_some() {
        return Err(Problem::bad_request("send at most one Idempotency-Key header"));
    }
    let key = std::str::from_utf8(key.as_bytes()).ok().filter(|key| is_valid_key(key)).ok_or_else(|| {
        Problem::bad_request(format!("Idempotency-Key must be 1 to {MAX_KEY_LENGTH} visible ASCII characters"))
    })?;
    Ok(derived_command_id(scope, key))
}

fn is_valid_key(key: &str) -> bool {
    (1..=MAX_KEY_LENGTH).contains(&key.len()) && key.bytes().all(|byte| byte.is_ascii_graphic())
}

/// The UUID v5 of the scope and the key. Fields are NUL-separated: none of them can contain NUL,
/// so no two scopes collide by shifting text from one field into the next.
fn derived_command_id(scope: CommandScope<'_>, key: &str) -> Uuid {
    let name = [scope.method, scope.route, scope.aggregate, scope.actor, key].join("\0");
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const SCOPE: CommandScope<'static> =
        CommandScope { method: "PATCH", route: "/v1/users/{id}", aggregate: "0193a6c2", actor: "anonymous" };

    fn headers(keys: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for key in keys {
            headers.append(IDEMPOTENCY_KEY, HeaderValue::from_bytes(key).unwrap());
        }
        headers
    }

    #[test]
    fn the_same_key_and_scope_give_the_same_command_id() {
        let first = command_id(&headers(&[b"order-42"]), SCOPE).unwrap();
        let again = command_id(&headers(&[b"order-42"]), SCOPE).unwrap();
        assert_eq!(first, again);
        assert_eq!(first.get_version_num(), 5);
        assert_eq!(first.get_variant(), uuid::Variant::RFC4122);
    }

    #[test]
    fn the_namespace_is_what_it_says() {
        assert_eq!(NAMESPACE, Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:keel:gateway:idempotency"));
    }

    #[test]
    fn another_key_or_scope_gives_another_command_id() {
        let base = command_id(&headers(&[b"order-42"]), SCOPE).unwrap();
        let others = [
            command_id(&headers(&[b"order-43"]), SCOPE),
            command_id(&headers(&[b"order-42"]), CommandScope { method: "POST", ..SCOPE }),
            command_id(&headers(&[b"order-42"]), CommandScope { route: "/v1/users", ..SCOPE }),
            command_id(&headers(&[b"order-42"]), CommandScope { aggregate: "0193a6c3", ..SCOPE }),
            command_id(&headers(&[b"order-42"]), CommandScope { actor: "someone", ..SCOPE }),
            // Text moved across a field boundary is another scope.
            command_id(&headers(&[b"order-42"]), CommandScope { aggregate: "0193a6c", actor: "2anonymous", ..SCOPE }),
        ];
        for other in others {
            assert_ne!(other.unwrap(), base);
        }
    }

    #[test]
    fn without_a_key_every_request_is_a_new_command() {
        let first = command_id(&HeaderMap::new(), SCOPE).unwrap();
        let second = command_id(&HeaderMap::new(), SCOPE).unwrap();
        assert_ne!(first, second);
        assert_eq!(first.get_version_num(), 7);
    }

    #[test]
    fn keys_must_be_short_visible_ascii_and_single() {
        let longest = "k".repeat(MAX_KEY_LENGTH);
        assert!(command_id(&headers(&[longest.as_bytes()]), SCOPE).is_ok());
        assert!(command_id(&headers(&[b"\"quoted-is-fine\""]), SCOPE).is_ok());
        let too_long = "k".repeat(MAX_KEY_LENGTH + 1);
        for key in [b"".as_slice(), b"with space", b"tab\there", "caf\u{e9}".as_bytes(), too_long.as_bytes()] {
            let problem = command_id(&headers(&[key]), SCOPE).unwrap_err();
            assert_eq!(problem.status, 400, "{key:?}");
        }
        assert_eq!(command_id(&headers(&[b"a", b"a"]), SCOPE).unwrap_err().status, 400);
    }
}
