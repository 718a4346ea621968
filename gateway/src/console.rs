//! `GET /console`: a small operator's page, built into the binary. It signs in with the API's
//! own routes, watches a stream (`/v1/streams/…`) with filters, and polls `/v1/projections` for
//! each projection's status and lag. Everything it does, it does through the public API.

use axum::{
    extract::Path,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};

use crate::problem::Problem;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");

/// Nothing but the gateway's own files, no framing, no inline code.
const POLICY: &str =
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub(crate) async fn index() -> Response {
    asset_response("text/html; charset=utf-8", INDEX)
}

pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "console.js" => asset_response("text/javascript; charset=utf-8", SCRIPT),
        "console.css" => asset_response("text/css; charset=utf-8", STYLE),
        _ => Problem::not_found(format!("the console has no file `{name}`")).into_response(),
    }
}

fn asset_response(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // A new gateway version serves new files: revalidate rather than run stale code.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
