//! What a stream sends from before its hub's position: the audit log's entries, which are the
//! valid events of every topic, already redacted, in the shape the hubs send live ones.

use std::time::Duration;

use chrono::SecondsFormat;
use keel_topics::{Topic, TopicNames};
use sqlx::PgPool;
use tokio::time::Instant;

use keel_read_models::audit;

use super::{
    cursor::Position,
    hub::{EventView, Filter, StreamEvent},
};

/// One partition's stretch of history: `[from, until_offset)`.
#[derive(Debug, Clone)]
pub struct Range {
    pub topic: Topic,
    pub partition: i32,
    pub from: Position,
    pub until_offset: i64,
}

/// Events read per query; a client holds at most one page beside its buffer.
pub const PAGE: i64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("the audit log has not reached the stream's start yet")]
    NotReady,
    #[error("the audit log cannot be read: {0}")]
    Database(#[from] sqlx::Error),
}

/// Waits until the audit projection has applied every range up to its end, at most `timeout`.
pub async fn wait_until_audited(
    pool: &PgPool,
    names: &TopicNames,
    ranges: &[Range],
    timeout: Duration,
) -> Result<(), HistoryError> {
    let deadline = Instant::now() + timeout;
    // Applied up to its end: its last record, the one before `until_offset`, is applied.
    let records: Vec<(String, i32, i64)> =
        ranges.iter().map(|range| (names.name(range.topic), range.partition, range.until_offset - 1)).collect();
    loop {
        let behind = keel_projections::unapplied(pool, "audit", &records).await?;
        if behind == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(HistoryError::NotReady);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The next page of `range`'s events that `filter` wants, in offset order.
pub async fn page(
    pool: &PgPool,
    names: &TopicNames,
    range: &Range,
    filter: &Filter,
) -> Result<Vec<StreamEvent>, HistoryError> {
    let types: Option<Vec<String>> = filter.types.as_ref().map(|types| types.iter().cloned().collect());
    let topic = names.name(range.topic);
    let stretch = audit::Stretch {
        topic: &topic,
        partition: range.partition,
        from: (range.from.offset, range.from.event_index),
        until_offset: range.until_offset,
    };
    let rows = audit::stretch(pool, stretch, filter.aggregate, types.as_deref(), PAGE).await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let json = EventView {
                topic: &row.topic,
                partition: row.partition,
                offset: row.offset,
                event_index: row.event_index,
                event_id: row.event_id,
                event_type: &row.event_type,
                schema_version: i64::from(row.schema_version),
                aggregate_id: row.aggregate_id,
                aggregate_version: row.aggregate_version,
                command_id: row.command_id,
                actor: &row.actor,
                occurred_at: row.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true),
                correlation_id: row.correlation_id,
                trace_id: row.trace_id.as_deref(),
                payload: &row.payload,
            }
            .to_json();
            StreamEvent {
                topic: range.topic,
                partition: row.partition,
                position: Position { offset: row.offset, event_index: row.event_index },
                aggregate_id: row.aggregate_id,
                event_type: row.event_type,
                json,
            }
        })
        .collect())
}
