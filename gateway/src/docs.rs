//! `GET /openapi.json`: the OpenAPI document the gateway built from its route table at start.

use axum::{
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};

use crate::AppState;

pub(crate) async fn openapi(State(state): State<AppState>) -> Response {
    let content_type = [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))];
    (content_type, state.openapi.clone()).into_response()
}
