//! `GET /v1/projections`: every projection's versions, checkpoints and lag behind the broker —
//! what `keel projections status` prints, for the console and for operators without a shell.

use axum::{Json, extract::State, response::IntoResponse};

use crate::{AppState, problem::Problem};

pub(crate) async fn status(State(state): State<AppState>) -> Result<impl IntoResponse, Problem> {
    let report = keel_projections::status::report(&state.pool, state.streams.kafka(), &state.names, &state.projections)
        .await
        .map_err(|error| {
            tracing::warn!(error = %format!("{error:#}"), "failed to report the projections' status");
            Problem::from_code(keel_proto::ErrorCode::Unavailable).detail("the projections' status cannot be read now")
        })?;
    Ok(Json(serde_json::json!({ "items": report })))
}
