//! The audit log: one entry per event of every valid commit, with sensitive fields redacted,
//! hash-chained per topic partition so that any change to a stored entry is detectable.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use keel_topics::{Topic, avro_json};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{FromRow, PgConnection, PgPool, QueryBuilder, Row};
use uuid::Uuid;

use keel_projections::{Commit, Projection, TableSpec, Tables};

pub struct AuditProjection;

const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "audit_log",
        ddl: "CREATE TABLE {table} (
                  topic             text        NOT NULL,
                  partition         integer     NOT NULL,
                  \"offset\"          bigint      NOT NULL,
                  event_index       integer     NOT NULL,
                  sequence          bigint      NOT NULL,
                  event_id          uuid        NOT NULL,
                  event_type        text        NOT NULL,
                  schema_version    integer     NOT NULL,
                  aggregate_id      uuid        NOT NULL,
                  aggregate_version bigint      NOT NULL,
                  command_id        uuid        NOT NULL,
                  actor             text        NOT NULL,
                  occurred_at       timestamptz NOT NULL,
                  correlation_id    uuid        NOT NULL,
                  trace_id          text,
                  payload           jsonb       NOT NULL,
                  prev_hash         bytea       NOT NULL,
                  hash              bytea       NOT NULL,
                  PRIMARY KEY (topic, partition, \"offset\", event_index),
                  UNIQUE (topic, partition, sequence)
              );
              CREATE INDEX {table}_aggregate ON {table} (aggregate_id, occurred_at);
              CREATE INDEX {table}_actor ON {table} (actor, occurred_at);
              CREATE INDEX {table}_occurred_at ON {table} (occurred_at);",
        view: true,
    },
    // The last link of each chain, so appending needs no scan.
    TableSpec {
        name: "audit_chain_heads",
        ddl: "CREATE TABLE {table} (
                  topic     text    NOT NULL,
                  partition integer NOT NULL,
                  sequence  bigint  NOT NULL,
                  hash      bytea   NOT NULL,
                  PRIMARY KEY (topic, partition)
              );",
        view: false,
    },
];

/// The hash a chain starts from.
const GENESIS: [u8; 32] = [0; 32];

/// One audit entry, as hashed and stored, and as `GET /v1/audit` serves it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_index: i32,
    pub sequence: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub aggregate_id: Uuid,
    pub aggregate_version: i64,
    pub command_id: Uuid,
    pub actor: String,
    #[serde(serialize_with = "rfc3339_micros")]
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub trace_id: Option<String>,
    /// Sensitive fields are redacted before the entry is made.
    pub payload: Value,
}

/// The columns of an [`AuditEntry`] in `audit_log`, for reading entries back.
pub const COLUMNS: &str = "topic, partition, \"offset\", event_index, sequence, event_id, event_type, \
    schema_version, aggregate_id, aggregate_version, command_id, actor, occurred_at, correlation_id, trace_id, payload";

fn rfc3339_micros<S: serde::Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::Micros, true))
}

impl AuditEntry {
    /// `sha256(prev_hash || canonical JSON of the entry)`; the canonical form sorts object keys,
    /// so it survives a round trip through `jsonb`.
    pub fn hash(&self, prev_hash: &[u8]) -> Vec<u8> {
        let document = json!({
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "event_index": self.event_index,
            "sequence": self.sequence,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "aggregate_id": self.aggregate_id,
            "aggregate_version": self.aggregate_version,
            "command_id": self.command_id,
            "actor": self.actor,
            "occurred_at": self.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            "correlation_id": self.correlation_id,
            "trace_id": self.trace_id,
            "payload": self.payload,
        });
        let mut hasher = Sha256::new();
        hasher.update(prev_hash);
        hasher.update(canonical_json(&document).as_bytes());
        hasher.finalize().to_vec()
    }
}

/// JSON with object keys sorted at every level and no insignificant whitespace.
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(object) => {
            let mut keys: Vec<&String> = object.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|key| format!("{}:{}", Value::String(key.clone()), canonical_json(&object[key])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(canonical_json).collect::<Vec<_>>().join(",")),
        scalar => scalar.to_string(),
    }
}

#[async_trait::async_trait]
impl Projection for AuditProjection {
    fn name(&self) -> &'static str {
        "audit"
    }

    fn code_version(&self) -> i32 {
        1
    }

    fn topics(&self) -> &'static [Topic] {
        Topic::ALL
    }

    fn tables(&self) -> &'static [TableSpec] {
        TABLES
    }

    async fn apply(&self, connection: &mut PgConnection, tables: Tables, commits: &[Commit]) -> anyhow::Result<()> {
        if commits.is_empty() {
            return Ok(());
        }
        let heads_table = tables.name("audit_chain_heads");
        let topics: Vec<&str> = commits.iter().map(|commit| commit.topic_name.as_str()).collect();
        let partitions: Vec<i32> = commits.iter().map(|commit| commit.partition).collect();
        // One writer per chain at a time (a dead-letter retry may run next to a live batch),
        // locked in a fixed order.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext($1 || '/' || topic), partition)
             FROM (SELECT DISTINCT topic, partition FROM UNNEST($2::text[], $3::int[]) AS k(topic, partition)
                   ORDER BY topic, partition) AS chains",
        )
        .bind(&heads_table)
        .bind(&topics)
        .bind(&partitions)
        .execute(&mut *connection)
        .await
        .context("failed to lock the audit chains")?;
        let head_rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT h.topic, h.partition, h.sequence, h.hash FROM {heads_table} h
             JOIN UNNEST($1::text[], $2::int[]) AS k(topic, partition) ON h.topic = k.topic AND h.partition = k.partition"
        )))
        .bind(&topics)
        .bind(&partitions)
        .fetch_all(&mut *connection)
        .await
        .context("failed to load audit chain heads")?;
        let mut heads: HashMap<(String, i32), (i64, Vec<u8>)> =
            head_rows.iter().map(|row| ((row.get(0), row.get(1)), (row.get(2), row.get(3)))).collect();

        let mut entries = Vec::new();
        for commit in commits {
            let header = &commit.header;
            let chain = (commit.topic_name.clone(), commit.partition);
            for (index, (meta, event)) in header.events.iter().zip(&commit.decoded.events).enumerate() {
                let (sequence, prev_hash) = heads.get(&chain).cloned().unwrap_or((0, GENESIS.to_vec()));
                let entry = AuditEntry {
                    topic: commit.topic_name.clone(),
                    partition: commit.partition,
                    offset: commit.offset,
                    event_index: index as i32,
                    sequence: sequence + 1,
                    event_id: meta.event_id,
                    event_type: meta.event_type.clone(),
                    schema_version: meta.schema_version as i32,
                    aggregate_id: header.aggregate_id,
                    aggregate_version: (header.expected_version + index as u64 + 1) as i64,
                    command_id: header.command_id,
                    actor: header.actor.clone(),
                    occurred_at: header.occurred_at,
                    correlation_id: header.correlation_id,
                    trace_id: header.trace_id(),
                    payload: avro_json::redacted(event),
                };
                let hash = entry.hash(&prev_hash);
                heads.insert(chain.clone(), (entry.sequence, hash.clone()));
                entries.push((entry, prev_hash, hash));
            }
        }
        insert_entries(connection, &tables.name("audit_log"), &entries).await?;
        let mut head_topics = Vec::new();
        let mut head_partitions = Vec::new();
        let mut sequences = Vec::new();
        let mut hashes = Vec::new();
        for ((topic, partition), (sequence, hash)) in heads {
            head_topics.push(topic);
            head_partitions.push(partition);
            sequences.push(sequence);
            hashes.push(hash);
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {heads_table} (topic, partition, sequence, hash)
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bytea[])
             ON CONFLICT (topic, partition) DO UPDATE SET sequence = excluded.sequence, hash = excluded.hash"
        )))
        .bind(&head_topics)
        .bind(&head_partitions)
        .bind(&sequences)
        .bind(&hashes)
        .execute(&mut *connection)
        .await
        .context("failed to save audit chain heads")?;
        Ok(())
    }
}

async fn insert_entries(
    connection: &mut PgConnection,
    table: &str,
    entries: &[(AuditEntry, Vec<u8>, Vec<u8>)],
) -> anyhow::Result<()> {
    // 18 parameters per row; stay far below PostgreSQL's 65,535.
    for chunk in entries.chunks(1000) {
        let mut query = QueryBuilder::new(format!(
            "INSERT INTO {table} (topic, partition, \"offset\", event_index, sequence, event_id, event_type,
             schema_version, aggregate_id, aggregate_version, command_id, actor, occurred_at, correlation_id,
             trace_id, payload, prev_hash, hash) "
        ));
        query.push_values(chunk, |mut row, (entry, prev_hash, hash)| {
            row.push_bind(&entry.topic)
                .push_bind(entry.partition)
                .push_bind(entry.offset)
                .push_bind(entry.event_index)
                .push_bind(entry.sequence)
                .push_bind(entry.event_id)
                .push_bind(&entry.event_type)
                .push_bind(entry.schema_version)
                .push_bind(entry.aggregate_id)
                .push_bind(entry.aggregate_version)
                .push_bind(entry.command_id)
                .push_bind(&entry.actor)
                .push_bind(entry.occurred_at)
                .push_bind(entry.correlation_id)
                .push_bind(&entry.trace_id)
                .push_bind(&entry.payload)
                .push_bind(prev_hash)
                .push_bind(hash);
        });
        query.build().execute(&mut *connection).await.context("failed to insert audit entries")?;
    }
    Ok(())
}

/// The first entry whose stored hashes do not match a recomputation of its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_index: i32,
    pub sequence: i64,
}

/// What `keel audit verify` found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub entries: u64,
    pub chains: u64,
    pub broken: Option<BrokenLink>,
}

/// Recomputes every chain from its genesis and names the first entry that does not match.
pub async fn verify(pool: &PgPool) -> anyhow::Result<Verification> {
    let chains = sqlx::query("SELECT DISTINCT topic, partition FROM audit_log ORDER BY 1, 2")
        .fetch_all(pool)
        .await
        .context("failed to list audit chains")?;
    let mut verification = Verification::default();
    for chain in chains {
        let topic: String = chain.get(0);
        let partition: i32 = chain.get(1);
        verification.chains += 1;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS}, prev_hash, hash FROM audit_log WHERE topic = $1 AND partition = $2 ORDER BY sequence"
        )))
        .bind(&topic)
        .bind(partition)
        .fetch_all(pool)
        .await
        .context("failed to read an audit chain")?;
        let mut prev_hash = GENESIS.to_vec();
        for (position, row) in rows.iter().enumerate() {
            verification.entries += 1;
            let entry = AuditEntry::from_row(row).context("failed to read an audit entry")?;
            let stored_prev: Vec<u8> = row.try_get("prev_hash")?;
            let stored_hash: Vec<u8> = row.try_get("hash")?;
            let expected = entry.hash(&prev_hash);
            let in_sequence = entry.sequence == position as i64 + 1;
            if !in_sequence || stored_prev != prev_hash || stored_hash != expected {
                verification.broken = Some(BrokenLink {
                    topic,
                    partition,
                    offset: entry.offset,
                    event_index: entry.event_index,
                    sequence: entry.sequence,
                });
                return Ok(verification);
            }
            prev_hash = stored_hash;
        }
    }
    Ok(verification)
}

// --- Queries -------------------------------------------------------------------------------------

/// Which entries [`entries`] reads; each given filter narrows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub actor: Option<String>,
    pub aggregate: Option<Uuid>,
    pub event_type: Option<String>,
    /// Inclusive, on `occurred_at`.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive, on `occurred_at`.
    pub to: Option<DateTime<Utc>>,
}

/// Where an entry stands in the time order of [`entries`]: `(occurred_at, topic, partition,
/// offset, event_index)`, a total order (the last four are the primary key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub occurred_at: DateTime<Utc>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_index: i32,
}

/// `rows` entries matching `filter` after `after`, in time order. Every input is a bound
/// parameter; each filter is a prefix of an index (`audit_log_actor`, `audit_log_aggregate`,
/// `audit_log_occurred_at`) whose next column is the leading sort key, so a page is an index
/// range scan.
pub async fn entries(
    pool: &PgPool,
    filter: &Filter,
    after: Option<&Place>,
    rows: i64,
) -> Result<Vec<AuditEntry>, sqlx::Error> {
    let mut sql = QueryBuilder::<sqlx::Postgres>::new(format!("SELECT {COLUMNS} FROM audit_log WHERE TRUE"));
    if let Some(actor) = &filter.actor {
        sql.push(" AND actor = ").push_bind(actor);
    }
    if let Some(aggregate) = filter.aggregate {
        sql.push(" AND aggregate_id = ").push_bind(aggregate);
    }
    if let Some(event_type) = &filter.event_type {
        sql.push(" AND event_type = ").push_bind(event_type);
    }
    if let Some(from) = filter.from {
        sql.push(" AND occurred_at >= ").push_bind(from);
    }
    if let Some(to) = filter.to {
        sql.push(" AND occurred_at < ").push_bind(to);
    }
    if let Some(after) = after {
        // The plain bound on the leading column lets the index start at the cursor; the row
        // comparison then orders ties exactly.
        sql.push(" AND occurred_at >= ").push_bind(after.occurred_at);
        sql.push(" AND (occurred_at, topic, partition, \"offset\", event_index) > (");
        sql.push_bind(after.occurred_at)
            .push(", ")
            .push_bind(after.topic.clone())
            .push(", ")
            .push_bind(after.partition)
            .push(", ")
            .push_bind(after.offset)
            .push(", ")
            .push_bind(after.event_index)
            .push(")");
    }
    sql.push(" ORDER BY occurred_at, topic, partition, \"offset\", event_index LIMIT ").push_bind(rows);
    sql.build_query_as::<AuditEntry>().fetch_all(pool).await
}

/// A stretch of one partition's entries: from `(offset, event_index)` up to (not including)
/// `until_offset`.
#[derive(Debug, Clone, Copy)]
pub struct Stretch<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub from: (i64, i32),
    pub until_offset: i64,
}

/// `rows` entries of `stretch`, of `aggregate` and of `types` when given, in log order.
pub async fn stretch(
    pool: &PgPool,
    stretch: Stretch<'_>,
    aggregate: Option<Uuid>,
    types: Option<&[String]>,
    rows: i64,
) -> Result<Vec<AuditEntry>, sqlx::Error> {
    let Stretch { topic, partition, from, until_offset } = stretch;
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM audit_log
         WHERE topic = $1 AND partition = $2 AND (\"offset\", event_index) >= ($3, $4) AND \"offset\" < $5
           AND ($6::uuid IS NULL OR aggregate_id = $6) AND ($7::text[] IS NULL OR event_type = ANY($7))
         ORDER BY \"offset\", event_index
         LIMIT $8"
    )))
    .bind(topic)
    .bind(partition)
    .bind(from.0)
    .bind(from.1)
    .bind(until_offset)
    .bind(aggregate)
    .bind(types)
    .bind(rows)
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a = json!({"b": 1, "a": {"d": [1, {"z": 1, "y": 2}], "c": "x"}});
        assert_eq!(canonical_json(&a), r#"{"a":{"c":"x","d":[1,{"y":2,"z":1}]},"b":1}"#);
    }
}
