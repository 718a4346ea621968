//! Query strings of list routes, and keyset pagination.
//!
//! A page's cursor is the sort key of its last item as base64url JSON: opaque to clients,
//! meaningful only to the route that made it. Keyset pagination never skips or repeats an item,
//! even while items are added, as long as the sort key is total.

use std::collections::BTreeMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Serialize, de::DeserializeOwned};

use crate::problem::Problem;

/// The parameters of a query string by name, each checked to be known and given once. An empty
/// value is no value.
pub(crate) fn params(pairs: Vec<(String, String)>, known: &[&str]) -> Result<BTreeMap<String, String>, Problem> {
    let mut params = BTreeMap::new();
    let mut seen = Vec::new();
    for (name, value) in pairs {
        if !known.contains(&name.as_str()) {
            return Err(Problem::bad_request(format!(
                "unknown parameter `{name}`; known parameters: {}",
                known.join(", ")
            )));
        }
        if seen.contains(&name) {
            return Err(Problem::bad_request(format!("parameter `{name}` is given more than once")));
        }
        seen.push(name.clone());
        if !value.is_empty() {
            params.insert(name, value);
        }
    }
    Ok(params)
}

/// `limit`, from 1 to `max`, `default` when absent.
pub(crate) fn limit(params: &BTreeMap<String, String>, default: i64, max: i64) -> Result<i64, Problem> {
    match params.get("limit") {
        None => Ok(default),
        Some(value) => value
            .parse()
            .ok()
            .filter(|limit| (1..=max).contains(limit))
            .ok_or_else(|| Problem::bad_request(format!("parameter `limit` must be an integer from 1 to {max}"))),
    }
}

pub(crate) fn encode_cursor<K: Serialize>(key: &K) -> String {
    // Sort keys are structs of strings and integers: they always serialize.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).unwrap_or_default())
}

pub(crate) fn decode_cursor<K: DeserializeOwned>(text: &str) -> Result<K, Problem> {
    URL_SAFE_NO_PAD
        .decode(text)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| Problem::bad_request("parameter `cursor` is not a cursor this route returned"))
}

/// One page of a list.
#[derive(Debug, Serialize)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    /// Pass it as `cursor` for the next page; `null` on the last page.
    pub(crate) next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page of `limit` items from `items`, fetched with one more than a page to tell whether
    /// another page follows; the cursor is the last item's `key`.
    pub(crate) fn of<K: Serialize>(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> K) -> Self {
        let more = items.len() as i64 > limit;
        items.truncate(limit.max(0) as usize);
        let next_cursor = match items.last() {
            Some(last) if more => Some(encode_cursor(&key(last))),
            _ => None,
        };
        Self { items, next_cursor }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Key {
        at: i64,
        id: String,
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let key = Key { at: 1_764_000_000_123_456, id: "x".into() };
        assert_eq!(decode_cursor::<Key>(&encode_cursor(&key)).unwrap(), key);
        for garbage in ["%%%", "bm90IGpzb24", &URL_SAFE_NO_PAD.encode(br#"{"at":1}"#)] {
            assert_eq!(decode_cursor::<Key>(garbage).unwrap_err().status, 400, "{garbage}");
        }
    }

    #[test]
    fn parameters_are_known_and_given_once() {
        let pairs = |text: &[(&str, &str)]| text.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let params = params(pairs(&[("limit", "3"), ("tag", "")]), &["limit", "tag"]).unwrap();
        assert_eq!(limit(&params, 10, 100).unwrap(), 3);
        assert!(!params.contains_key("tag"));
        assert!(super::params(pairs(&[("nope", "1")]), &["limit"]).unwrap_err().detail.unwrap().contains("`nope`"));
        assert!(super::params(pairs(&[("limit", "1"), ("limit", "2")]), &["limit"]).is_err());
        let too_big = super::params(pairs(&[("limit", "101")]), &["limit"]).unwrap();
        assert!(limit(&too_big, 10, 100).is_err());
    }

    #[test]
    fn a_page_says_whether_another_follows() {
        let page = Page::of(vec![1, 2, 3], 2, |item| *item);
        assert_eq!(page.items, [1, 2]);
        assert_eq!(decode_cursor::<i32>(page.next_cursor.as_deref().unwrap()).unwrap(), 2);
        assert!(Page::of(vec![1, 2], 2, |item| *item).next_cursor.is_none());
    }
}
