//! Announcements of appended records, so that readers fetch a partition only while it holds
//! records they have not read ([`crate::reader`]).
//!
//! A writer that has appended to a partition announces the partition's new end on the PostgreSQL
//! channel [`CHANNEL`] ([`Announcer`]); every process that reads the log live hears it through
//! its [`Notifications`](keel_runtime::notifications::Notifications) and hands it to its readers.
//! Announcements are hints, not the truth: one that is lost (a listener reconnecting, a writer dying between its append and
//! its announcement) delays a reader until its next watermark sweep, never more. The log itself
//! is never read from PostgreSQL.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The PostgreSQL channel of announcements.
pub const CHANNEL: &str = "keel_log";

/// The least time between two announcements of one process.
pub const ANNOUNCE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(25);

/// PostgreSQL refuses payloads of 8000 bytes and more.
const MAX_PAYLOAD: usize = 7_900;

/// Where a partition's log ends: records exist below `end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEnd {
    /// The full topic name.
    pub topic: String,
    pub partition: i32,
    pub end: i64,
}

/// Payloads: `topic/partition/end` entries separated by spaces (topic names hold no spaces).
fn encode(ends: &[LogEnd]) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut payload = String::new();
    for end in ends {
        let entry = format!("{}/{}/{}", end.topic, end.partition, end.end);
        if !payload.is_empty() && payload.len() + 1 + entry.len() > MAX_PAYLOAD {
            payloads.push(std::mem::take(&mut payload));
        }
        if !payload.is_empty() {
            payload.push(' ');
        }
        payload.push_str(&entry);
    }
    if !payload.is_empty() {
        payloads.push(payload);
    }
    payloads
}

fn decode(payload: &str) -> Vec<LogEnd> {
    payload
        .split(' ')
        .filter_map(|entry| {
            let mut parts = entry.rsplitn(3, '/');
            let end = parts.next()?.parse().ok()?;
            let partition = parts.next()?.parse().ok()?;
            let topic = parts.next().filter(|topic| !topic.is_empty())?;
            Some(LogEnd { topic: topic.to_owned(), partition, end })
        })
        .collect()
}

/// Where partitions end, from one notice of [`CHANNEL`].
pub(crate) fn heard(payload: &str) -> Vec<LogEnd> {
    decode(payload)
}

/// Announces the ends of partitions this process appended to. [`Self::appended`] never waits:
/// ends gather while an announcement is on its way (and for [`ANNOUNCE_INTERVAL`] after it) and go
/// out together in the next one, so a process announces at most once per interval however fast
/// it appends, and at once after a quiet spell.
#[derive(Clone, Default)]
pub struct Announcer {
    pending: Arc<Mutex<BTreeMap<(String, i32), i64>>>,
    wake: Arc<Notify>,
}

impl Announcer {
    pub fn appended(&self, topic: &str, partition: i32, end: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = pending.entry((topic.to_owned(), partition)).or_insert(end);
        *slot = (*slot).max(end);
        drop(pending);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<LogEnd> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        pending.into_iter().map(|((topic, partition), end)| LogEnd { topic, partition, end }).collect()
    }

    /// Sends announcements until `shutdown`. A failed one is dropped (readers' sweeps find what
    /// it announced); the next append announces again.
    pub async fn run(self, pool: PgPool, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = self.wake.notified() => {}
            }
            for payload in encode(&self.take()) {
                if let Err(error) = notify(&pool, &payload).await {
                    tracing::debug!(%error, "failed to announce appended records");
                    metrics::counter!("keel_log_announcements_failed_total").increment(1);
                }
            }
            tokio::time::sleep(ANNOUNCE_INTERVAL).await;
        }
    }
}

/// One round trip, in a transaction of its own that does not wait for the WAL to reach the disk:
/// an announcement lost to a database crash costs a reader one sweep interval, nothing else.
async fn notify(pool: &PgPool, payload: &str) -> Result<(), sqlx::Error> {
    let statement = format!(
        "BEGIN; SET LOCAL synchronous_commit TO OFF; SELECT pg_notify('{CHANNEL}', '{}'); COMMIT;",
        payload.replace('\'', "''")
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement)).execute(pool).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(topic: &str, partition: i32, end: i64) -> LogEnd {
        LogEnd { topic: topic.into(), partition, end }
    }

    #[test]
    fn payloads_round_trip_and_stay_under_the_limit() {
        let ends: Vec<LogEnd> = (0..1000).map(|index| end("staging.identity.users", index % 8, index as i64)).collect();
        let payloads = encode(&ends);
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|payload| payload.len() <= MAX_PAYLOAD));
        let decoded: Vec<LogEnd> = payloads.iter().flat_map(|payload| decode(payload)).collect();
        assert_eq!(decoded, ends);
    }

    #[test]
    fn malformed_entries_are_ignored() {
        assert_eq!(decode("a/1/2 junk /3/4 b/x/5 c/6/7"), [end("a", 1, 2), end("c", 6, 7)]);
    }

    #[test]
    fn the_announcer_keeps_the_furthest_end_per_partition() {
        let announcer = Announcer::default();
        announcer.appended("t", 0, 5);
        announcer.appended("t", 0, 3);
        announcer.appended("t", 1, 1);
        assert_eq!(announcer.take(), [end("t", 0, 5), end("t", 1, 1)]);
        assert!(announcer.take().is_empty());
    }
}
