//! `keel replay`: prints the stored records of a topic, decoded, for people (`pretty`) or for
//! tools (`json`, one object per line). It reads the source of truth directly, with no consumer
//! group and no committed offsets, so it never disturbs the roles reading the same topic.
//!
//! Records of one partition come in offset order; records of different partitions interleave
//! in the order the broker delivers them (Kafka orders nothing across partitions).
//! `--from` / `--to` are half-open: `--from` is the first record printed, `--to` the first one
//! not printed. A time is resolved once, at start, to the first offset of each partition whose
//! record timestamp is at or after it (Kafka's `offsets_for_times`).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, BufWriter, Stdout, Write},
    process::ExitCode,
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, anyhow};
use chrono::{DateTime, SecondsFormat, Utc};
use keel_runtime::{KafkaConfig, lifecycle::cancel_on_signal};
use keel_topics::{
    CommitHeader, Decoded, EnvelopeError, SchemaRegistryCodec, Topic, TopicNames, avro_json, kafka::client_config,
};
use rdkafka::{
    ClientContext, Offset, TopicPartitionList,
    config::RDKafkaLogLevel,
    consumer::{Consumer, ConsumerContext, StreamConsumer},
    error::KafkaError,
    message::{Message, OwnedHeaders, OwnedMessage},
};
use serde::Serialize;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use crate::config::KeelConfig;

/// Exit status of a usage error (unknown topic or partition), as clap uses for bad arguments.
const USAGE: u8 = 2;
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at decoding a record while the schema registry does not answer.
const REGISTRY_ATTEMPTS: u32 = 4;

/// `keel replay`'s arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The topic, by catalogue name (`identity.users`); `kafka.topic_prefix` is prepended.
    #[arg(long)]
    topic: String,
    /// The first record to print: an offset (in every selected partition) or an RFC 3339 time.
    /// Default: the beginning of each partition.
    #[arg(long)]
    from: Option<LogPoint>,
    /// The first record not to print: an offset or an RFC 3339 time. Default: the end of each
    /// partition when the replay starts.
    #[arg(long, conflicts_with = "follow")]
    to: Option<LogPoint>,
    /// Only this partition; repeat for several. Default: every partition.
    #[arg(long = "partition", value_name = "P")]
    partitions: Vec<i32>,
    /// `pretty` for people, `json` for tools (JSON Lines: one object per record).
    #[arg(long, value_enum, default_value_t = Format::Pretty)]
    format: Format,
    /// Keep printing records as they are appended, until Ctrl-C.
    #[arg(long)]
    follow: bool,
    /// Print the fields schemas mark `keel.sensitive` (email, display name…) as stored
    /// instead of `[redacted]`.
    #[arg(long)]
    show_sensitive: bool,
}

/// A point in each partition of a topic: an offset, or the first record at or after a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogPoint {
    Offset(i64),
    Time(DateTime<Utc>),
}

impl FromStr for LogPoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(offset) = text.parse::<i64>() {
            return if offset >= 0 { Ok(Self::Offset(offset)) } else { Err("an offset is not negative".into()) };
        }
        DateTime::parse_from_rfc3339(text)
            .map(|time| Self::Time(time.with_timezone(&Utc)))
            .map_err(|_| format!("`{text}` is neither an offset nor an RFC 3339 time such as 2026-11-25T10:00:00Z"))
    }
}

/// How records are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Pretty,
    Json,
}

/// Runs `keel replay`: exit 0 when every record decoded, 1 when some did not (each is printed
/// with its error) or reading failed, 2 on a usage error.
pub async fn run(args: ReplayArgs, config: &KeelConfig) -> anyhow::Result<ExitCode> {
    let names = TopicNames::new(config.kafka.topic_prefix.clone());
    let Some(topic) = catalogue_topic(&names, &args.topic) else {
        let known: Vec<&str> = Topic::ALL.iter().map(|topic| topic.spec().base_name).collect();
        eprintln!("keel replay: unknown topic `{}`; known topics: {}", args.topic, known.join(", "));
        return Ok(ExitCode::from(USAGE));
    };
    let topic_name = names.name(topic);
    let consumer = consumer(&config.kafka)?;
    let partition_count = partition_count(&consumer, &topic_name)?;
    let partitions = match select_partitions(&args.partitions, partition_count) {
        Ok(partitions) => partitions,
        Err(message) => {
            eprintln!("keel replay: {message}");
            return Ok(ExitCode::from(USAGE));
        }
    };
    let ranges = resolve_ranges(&consumer, &topic_name, &partitions, args.from, args.to, args.follow)?;
    let codec = SchemaRegistryCodec::new(&config.schema_registry.url, names)
        .context("failed to create the schema registry client")?;
    // Sensitive fields are sealed: showing them takes their keys.
    let vault = if args.show_sensitive {
        let pool = keel_runtime::postgres::pool(&config.database, "keel-replay", crate::root::TOOL_CONNECTIONS)?;
        Some(keel_topics::Vault::new(pool, &config.personal_data)?)
    } else {
        None
    };
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let mut replay = Replay {
        consumer,
        codec,
        vault,
        topic,
        topic_name,
        format: args.format,
        follow: args.follow,
        out: BufWriter::new(io::stdout()),
        summary: Summary::default(),
    };
    replay.run(&ranges, &shutdown).await?;
    let summary = replay.summary;
    eprintln!(
        "keel replay: {} records, {} events, {} undecodable",
        summary.records, summary.events, summary.undecodable
    );
    Ok(if summary.undecodable == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The catalogue topic `name` refers to: a base name, or a full name with this installation's
/// prefix.
fn catalogue_topic(names: &TopicNames, name: &str) -> Option<Topic> {
    Topic::ALL.iter().copied().find(|topic| topic.spec().base_name == name).or_else(|| names.parse(name))
}

fn select_partitions(requested: &[i32], count: i32) -> Result<Vec<i32>, String> {
    if requested.is_empty() {
        return Ok((0..count).collect());
    }
    let selected: BTreeSet<i32> = requested.iter().copied().collect();
    match selected.iter().find(|partition| !(0..count).contains(*partition)) {
        Some(partition) => {
            Err(format!("partition {partition} does not exist; the topic has partitions 0 to {}", count - 1))
        }
        None => Ok(selected.into_iter().collect()),
    }
}

/// librdkafka's diagnostics go to stderr: stdout carries records only.
struct ReplayContext;

impl ClientContext for ReplayContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
                | RDKafkaLogLevel::Warning
        ) {
            eprintln!("keel replay: kafka {facility}: {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        eprintln!("keel replay: kafka: {error}: {reason}");
    }
}

impl ConsumerContext for ReplayContext {}

/// A consumer that reads assigned partitions only: no subscription, no committed offsets.
fn consumer(config: &KafkaConfig) -> anyhow::Result<StreamConsumer<ReplayContext>> {
    client_config(config)
        .set("group.id", "keel-replay")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // The end of a bounded read is known exactly, even when the last offsets are gaps.
        .set("enable.partition.eof", "true")
        .create_with_context(ReplayContext)
        .context("failed to create the Kafka consumer")
}

fn partition_count(consumer: &StreamConsumer<ReplayContext>, topic: &str) -> anyhow::Result<i32> {
    let metadata = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), KAFKA_TIMEOUT))
        .with_context(|| format!("failed to fetch the metadata of {topic}"))?;
    let count =
        metadata.topics().iter().find(|found| found.name() == topic).map_or(0, |found| found.partitions().len());
    if count == 0 {
        anyhow::bail!("topic {topic} does not exist; run `keel topics create`");
    }
    Ok(count as i32)
}

/// The offsets one partition is read between; no end when following.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    start: i64,
    end: Option<i64>,
}

impl Range {
    fn is_empty(&self) -> bool {
        self.end.is_some_and(|end| self.start >= end)
    }
}

/// Turns `--from` / `--to` into offsets per partition. Without `to`, a bounded read ends at the
/// end of each partition as of now; a followed one never ends.
#[tracing::instrument(skip_all, fields(topic = %topic))]
fn resolve_ranges(
    consumer: &StreamConsumer<ReplayContext>,
    topic: &str,
    partitions: &[i32],
    from: Option<LogPoint>,
    to: Option<LogPoint>,
    follow: bool,
) -> anyhow::Result<BTreeMap<i32, Range>> {
    let mut watermarks = BTreeMap::new();
    for &partition in partitions {
        let marks = tokio::task::block_in_place(|| consumer.fetch_watermarks(topic, partition, KAFKA_TIMEOUT))
            .with_context(|| format!("failed to fetch the watermarks of {topic}/{partition}"))?;
        watermarks.insert(partition, marks);
    }
    let from_offsets = time_offsets(consumer, topic, partitions, from)?;
    let to_offsets = time_offsets(consumer, topic, partitions, to)?;
    let mut ranges = BTreeMap::new();
    for (partition, (low, high)) in watermarks {
        // A time after every record of a partition resolves to its end.
        let at = |point: LogPoint, offsets: &BTreeMap<i32, Option<i64>>| match point {
            LogPoint::Offset(offset) => offset,
            LogPoint::Time(_) => offsets.get(&partition).copied().flatten().unwrap_or(high),
        };
        let start = from.map_or(low, |point| at(point, &from_offsets)).max(low);
        let end = (!follow).then(|| to.map_or(high, |point| at(point, &to_offsets)).min(high));
        ranges.insert(partition, Range { start, end });
    }
    Ok(ranges)
}

/// For a time: the first offset at or after it in each partition (`None`: no such record yet).
fn time_offsets(
    consumer: &StreamConsumer<ReplayContext>,
    topic: &str,
    partitions: &[i32],
    point: Option<LogPoint>,
) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let Some(LogPoint::Time(time)) = point else { return Ok(BTreeMap::new()) };
    let mut query = TopicPartitionList::new();
    for &partition in partitions {
        query.add_partition_offset(topic, partition, Offset::Offset(time.timestamp_millis()))?;
    }
    let answer = tokio::task::block_in_place(|| consumer.offsets_for_times(query, KAFKA_TIMEOUT))
        .with_context(|| format!("failed to look up the offsets of {topic} at {time}"))?;
    answer
        .elements_for_topic(topic)
        .iter()
        .map(|element| {
            element.error().with_context(|| format!("failed to look up {topic}/{} at {time}", element.partition()))?;
            let offset = match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            };
            anyhow::Ok((element.partition(), offset))
        })
        .collect()
}

#[derive(Debug, Default, Clone, Copy)]
struct Summary {
    records: u64,
    events: u64,
    undecodable: u64,
}

struct Replay {
    consumer: StreamConsumer<ReplayContext>,
    codec: SchemaRegistryCodec,
    topic: Topic,
    topic_name: String,
    format: Format,
    /// The keys of sealed fields, with `--show-sensitive`.
    vault: Option<keel_topics::Vault>,
    follow: bool,
    out: BufWriter<Stdout>,
    summary: Summary,
}

impl Replay {
    /// Prints the records of `ranges` until every range is read (or, following, until a signal).
    async fn run(&mut self, ranges: &BTreeMap<i32, Range>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut pending: BTreeSet<i32> =
            ranges.iter().filter(|(_, range)| !range.is_empty()).map(|(partition, _)| *partition).collect();
        if pending.is_empty() {
            return Ok(());
        }
        let mut assignment = TopicPartitionList::new();
        for partition in &pending {
            assignment.add_partition_offset(&self.topic_name, *partition, Offset::Offset(ranges[partition].start))?;
        }
        self.consumer.assign(&assignment).context("failed to assign partitions")?;
        while self.follow || !pending.is_empty() {
            let received = tokio::select! {
                () = shutdown.cancelled() => break,
                received = self.consumer.recv() => received.map(|message| message.detach()),
            };
            let message = match received {
                Ok(message) => message,
                // The consumer reached the end of the log in that partition, which a bounded
                // read's end never passes.
                Err(KafkaError::PartitionEOF(partition)) => {
                    if !self.follow {
                        pending.remove(&partition);
                    }
                    continue;
                }
                Err(error) => return Err(error).context("failed to read from Kafka"),
            };
            if let Some(end) = ranges.get(&message.partition()).and_then(|range| range.end) {
                if message.offset() + 1 >= end {
                    pending.remove(&message.partition());
                }
                if message.offset() >= end {
                    continue;
                }
            }
            let record = self.decode(&message).await?;
            if !self.print(&record)? {
                break;
            }
        }
        match self.out.flush() {
            Err(error) if error.kind() != io::ErrorKind::BrokenPipe => Err(error).context("failed to write to stdout"),
            _ => Ok(()),
        }
    }

    /// One record as printed. Only a schema registry that stays unreachable is an error: a
    /// record that cannot be decoded is a [`Content::Undecodable`].
    async fn decode(&mut self, message: &OwnedMessage) -> anyhow::Result<RecordView> {
        self.summary.records += 1;
        let content = match self.decode_commit(message).await? {
            Ok(commit) => {
                self.summary.events += commit.events.len() as u64;
                Content::Commit(commit)
            }
            Err(error) => {
                self.summary.undecodable += 1;
                Content::Undecodable { error }
            }
        };
        Ok(RecordView {
            topic: self.topic_name.clone(),
            partition: message.partition(),
            offset: message.offset(),
            timestamp: message
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis)
                .map(|time| time.to_rfc3339_opts(SecondsFormat::Millis, true)),
            content,
        })
    }

    async fn decode_commit(&self, message: &OwnedMessage) -> anyhow::Result<Result<CommitView, String>> {
        let no_headers = OwnedHeaders::new();
        let header = match CommitHeader::from_headers(message.headers().unwrap_or(&no_headers)) {
            Ok(header) => header,
            Err(error) => return Ok(Err(format!("envelope: {error}"))),
        };
        let Some(payload) = message.payload() else { return Ok(Err("the record has no value".into())) };
        let mut decoded = match self.decode_value(payload).await? {
            Ok(decoded) => decoded,
            Err(error) => return Ok(Err(error)),
        };
        if decoded.events.len() != header.events.len() {
            let error =
                EnvelopeError::EventCountMismatch { headers: header.events.len(), events: decoded.events.len() };
            return Ok(Err(format!("envelope: {error}")));
        }
        let shown = match &self.vault {
            None => Shown::Redacted,
            Some(vault) => match vault.open(&header, &mut decoded).await {
                Ok(keel_topics::Opened::Clear) => Shown::Clear,
                Ok(keel_topics::Opened::Forgotten) => Shown::Erased,
                Err(keel_topics::VaultError::Seal(error)) => return Ok(Err(format!("sealed fields: {error}"))),
                Err(error) => return Err(anyhow::Error::new(error).context("failed to read the keys of sealed fields")),
            },
        };
        Ok(Ok(CommitView::new(&header, &decoded, shown)))
    }

    /// The decoded value, retrying while the registry does not answer: an outage is not a
    /// property of the record and must not be reported as one.
    async fn decode_value(&self, payload: &[u8]) -> anyhow::Result<Result<Decoded, String>> {
        let mut backoff = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            match self.codec.decode(self.topic, payload).await {
                Ok(decoded) => return Ok(Ok(decoded)),
                Err(error) if error.is_retriable() && attempt < REGISTRY_ATTEMPTS => {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(error) if error.is_retriable() => {
                    return Err(anyhow!(error).context("the schema registry does not answer"));
                }
                Err(error) => return Ok(Err(error.to_string())),
            }
        }
    }

    /// Writes one record; `false` when stdout is closed (`keel replay | head`).
    fn print(&mut self, record: &RecordView) -> anyhow::Result<bool> {
        let text = match self.format {
            Format::Json => serde_json::to_string(record).context("failed to render a record")?,
            Format::Pretty => record.pretty(),
        };
        let written = writeln!(self.out, "{text}").and_then(|()| if self.follow { self.out.flush() } else { Ok(()) });
        match written {
            Ok(()) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Ok(false),
            Err(error) => Err(error).context("failed to write to stdout"),
        }
    }
}

/// A record as printed: its position, then its commit or why it could not be decoded.
#[derive(Debug, Serialize)]
struct RecordView {
    topic: String,
    partition: i32,
    offset: i64,
    /// The Kafka record timestamp, which `--from` / `--to` times compare with.
    timestamp: Option<String>,
    #[serde(flatten)]
    content: Content,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Content {
    Commit(CommitView),
    Undecodable { error: String },
}

#[derive(Debug, Serialize)]
struct CommitView {
    command_id: String,
    aggregate_id: String,
    expected_version: u64,
    occurred_at: String,
    actor: String,
    correlation_id: String,
    causation_id: Option<String>,
    traceparent: Option<String>,
    events: Vec<EventView>,
}

#[derive(Debug, Serialize)]
struct EventView {
    event_id: String,
    event_type: String,
    schema_version: u32,
    aggregate_version: u64,
    data: Json,
}

/// How sensitive fields are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shown {
    Redacted,
    /// As stored, opened with their key (`--show-sensitive`).
    Clear,
    /// Their key was erased: `[erased]`.
    Erased,
}

impl CommitView {
    fn new(header: &CommitHeader, decoded: &Decoded, shown: Shown) -> Self {
        let events = header
            .events
            .iter()
            .zip(&decoded.events)
            .enumerate()
            .map(|(index, (meta, event))| EventView {
                event_id: meta.event_id.to_string(),
                event_type: meta.event_type.clone(),
                schema_version: meta.schema_version,
                aggregate_version: header.expected_version + index as u64 + 1,
                data: match shown {
                    Shown::Redacted => avro_json::redacted(event),
                    Shown::Clear => avro_json::unredacted(event),
                    Shown::Erased => avro_json::erased(event),
                },
            })
            .collect();
        Self {
            command_id: header.command_id.to_string(),
            aggregate_id: header.aggregate_id.to_string(),
            expected_version: header.expected_version,
            occurred_at: header.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            actor: header.actor.clone(),
            correlation_id: header.correlation_id.to_string(),
            causation_id: header.causation_id.map(|id| id.to_string()),
            traceparent: header.traceparent.clone(),
            events,
        }
    }

    fn versions(&self) -> String {
        let first = self.expected_version + 1;
        match self.events.len() as u64 {
            0 => format!("v{} (no events)", self.expected_version),
            1 => format!("v{first}"),
            count => format!("v{first}..v{}", self.expected_version + count),
        }
    }
}

impl RecordView {
    /// Several lines for people, ending with a blank line.
    fn pretty(&self) -> String {
        let position = format!("{}/{}@{}", self.topic, self.partition, self.offset);
        let timestamp = self.timestamp.as_deref().unwrap_or("-");
        match &self.content {
            Content::Undecodable { error } => format!("{position}  {timestamp}  UNDECODABLE: {error}\n"),
            Content::Commit(commit) => {
                let mut text = format!(
                    "{position}  {timestamp}\n  aggregate {} {}  command {}\n  actor {}  correlation {}",
                    commit.aggregate_id,
                    commit.versions(),
                    commit.command_id,
                    commit.actor,
                    commit.correlation_id
                );
                if let Some(causation_id) = &commit.causation_id {
                    text.push_str(&format!("  causation {causation_id}"));
                }
                text.push_str(&format!("  occurred {}\n", commit.occurred_at));
                for event in &commit.events {
                    text.push_str(&format!("  {} v{}  {}\n", event.event_type, event.schema_version, event.data));
                }
                text
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_points_are_offsets_or_rfc3339_times() {
        assert_eq!("42".parse(), Ok(LogPoint::Offset(42)));
        assert!("-1".parse::<LogPoint>().is_err());
        let Ok(LogPoint::Time(time)) = "2026-11-25T10:00:00.5+01:00".parse() else { panic!("a time") };
        assert_eq!(time.to_rfc3339_opts(SecondsFormat::Millis, true), "2026-11-25T09:00:00.500Z");
        assert!("yesterday".parse::<LogPoint>().is_err());
    }

    #[test]
    fn partitions_are_checked_against_the_topic() {
        assert_eq!(select_partitions(&[], 3), Ok(vec![0, 1, 2]));
        assert_eq!(select_partitions(&[2, 0, 2], 3), Ok(vec![0, 2]));
        assert!(select_partitions(&[3], 3).unwrap_err().contains("partition 3"));
        assert!(select_partitions(&[-1], 3).is_err());
    }

    #[test]
    fn topics_are_named_by_base_or_full_name() {
        let names = TopicNames::new("staging.");
        assert_eq!(catalogue_topic(&names, "identity.users"), Some(Topic::IdentityUsers));
        assert_eq!(catalogue_topic(&names, "staging.identity.users"), Some(Topic::IdentityUsers));
        assert_eq!(catalogue_topic(&names, "identity.nothing"), None);
    }

    #[test]
    fn bounded_ranges_know_when_they_are_empty() {
        assert!(Range { start: 3, end: Some(3) }.is_empty());
        assert!(!Range { start: 2, end: Some(3) }.is_empty());
        assert!(!Range { start: 3, end: None }.is_empty());
    }
}
