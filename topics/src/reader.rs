//! Reading partitions from positions Keel keeps itself, on demand, optionally only up to the end
//! of the log as it was when reading started.
//!
//! A Kafka consumer normally long-polls every partition it holds, all the time. Some brokers
//! serve a held fetch by reading their storage again and again until it runs out (nisshi does:
//! on PostgreSQL storage, several queries per partition per pass), so an idle consumer costs the
//! broker work in proportion to the partitions it holds. This reader fetches a partition only
//! while it knows of records there that it has not read yet:
//!
//! - ends announced by the writers that appended them ([`crate::wakeups`]);
//! - ends found by a watermark sweep: at the start, every [`SWEEP_WITH_WAKEUPS`] (or
//!   [`SWEEP_WITHOUT_WAKEUPS`] for a reader that hears no announcements), and whenever
//!   announcements may have been missed — the safety net for an announcement that never came;
//! - for a bounded read, the ends when reading started;
//! - the high watermarks the client learns from the fetches it makes anyway.
//!
//! A partition read up to its known end is handed back (unassigned; it is assigned again at its
//! next record when more is known), so an idle reader sends the broker nothing but its sweeps.
//! (Pausing would keep it assigned, but resuming a paused partition does not wake the client's
//! fetcher, which then waits up to a second before it fetches.)

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use keel_runtime::KafkaConfig;
use keel_runtime::notifications::{Notice, Notifications};
use rdkafka::{
    ClientConfig, ClientContext, Offset, Statistics, TopicPartitionList,
    consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer},
    message::{Message, OwnedMessage},
};
use tokio::{sync::broadcast, time::Instant};

use crate::{kafka::client_config, wakeups};

/// A partition of a topic, by full topic name.
pub type PartitionKey = (String, i32);

/// How often a reader that hears announcements sweeps the watermarks anyway.
pub const SWEEP_WITH_WAKEUPS: Duration = Duration::from_secs(10);
/// How often a reader that hears no announcements sweeps.
pub const SWEEP_WITHOUT_WAKEUPS: Duration = Duration::from_secs(1);
/// A partition fetched this long without a record while records are known to be there is handed back
/// and looked at again by the next sweep (an end that turned out not to exist, e.g. a recreated
/// topic), so that no partition is fetched forever.
const STALL: Duration = Duration::from_secs(5);
/// The least time between two fetches of a live reader while records keep coming, unless its
/// owner says otherwise.
pub const LIVE_FETCH_INTERVAL: Duration = Duration::from_millis(25);
/// How long a watermark query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// High watermarks as librdkafka's statistics report them, every second, from fetch responses.
#[derive(Clone, Default)]
struct WatermarkContext {
    high: Arc<Mutex<HashMap<PartitionKey, i64>>>,
}

impl ClientContext for WatermarkContext {
    fn stats(&self, statistics: Statistics) {
        let mut high = self.high.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (topic, topic_statistics) in statistics.topics {
            for (partition, partition_statistics) in topic_statistics.partitions {
                if partition >= 0 && partition_statistics.hi_offset >= 0 {
                    high.insert((topic.clone(), partition), partition_statistics.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for WatermarkContext {}

/// What the reader does with a partition's fetcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetching {
    /// Not assigned to the client: nothing is fetched.
    Unassigned,
    Active {
        /// When the last record arrived (or fetching started).
        since: Instant,
    },
}

#[derive(Debug, Clone)]
struct Cursor {
    /// The next offset to hand out.
    next: i64,
    /// Records are known to exist below this offset.
    end: i64,
    fetching: Fetching,
}

impl Cursor {
    fn behind(&self) -> bool {
        self.next < self.end
    }
}

/// Reads assigned partitions of one or more topics, without consumer-group offsets.
pub struct PartitionReader {
    consumer: StreamConsumer<WatermarkContext>,
    /// Watermark queries, on a client of their own: on the consuming one they would wait behind
    /// its fetches.
    queries: Arc<BaseConsumer>,
    watermarks: WatermarkContext,
    assigned: Vec<PartitionKey>,
    cursors: BTreeMap<PartitionKey, Cursor>,
    wakeups: Option<broadcast::Receiver<Notice>>,
    sweep_every: Duration,
    /// When the next sweep is due; `None`: at once.
    next_sweep: Option<Instant>,
    /// For a bounded read: the offset each partition must reach (its high watermark at start).
    until: Option<BTreeMap<PartitionKey, i64>>,
    /// When [`Self::next`] last returned: time the caller spends elsewhere is no partition's stall.
    returned_at: Option<Instant>,
}

impl PartitionReader {
    /// Reads `partitions` of `topic`, each from the offset in `start` (the next offset to read)
    /// or from the beginning of the partition.
    pub fn assign(
        config: &KafkaConfig,
        topic: &str,
        partitions: impl IntoIterator<Item = i32>,
        start: &BTreeMap<i32, i64>,
    ) -> anyhow::Result<Self> {
        let keys: Vec<PartitionKey> = partitions.into_iter().map(|partition| (topic.to_owned(), partition)).collect();
        let start = start.iter().map(|(partition, offset)| ((topic.to_owned(), *partition), *offset)).collect();
        Self::assign_many(config, keys, &start)
    }

    /// Reads partitions of several topics; `start` holds the next offset to read per partition
    /// (absent: the beginning). Made for reading much at once (a rebuild, a catch-up): the client
    /// fetches ahead while the reader's caller works.
    pub fn assign_many(
        config: &KafkaConfig,
        partitions: Vec<PartitionKey>,
        start: &BTreeMap<PartitionKey, i64>,
    ) -> anyhow::Result<Self> {
        Self::create(client_config(config), partitions, start)
    }

    /// Reads partitions of several topics as they grow, for as long as the process runs (the
    /// projector, the stream hubs): records are fetched as soon as their writers announce them
    /// on `notifications`, and under a steady stream at most one fetch per `fetch_interval`
    /// gathers what arrived meanwhile (each fetch costs the broker a pass over every partition it
    /// names, however few records it returns).
    pub fn live(
        config: &KafkaConfig,
        partitions: Vec<PartitionKey>,
        start: &BTreeMap<PartitionKey, i64>,
        notifications: &Notifications,
        fetch_interval: Duration,
    ) -> anyhow::Result<Self> {
        let mut settings = client_config(config);
        // Fetch again only once what was fetched is taken, and then not before the interval.
        settings.set("queued.min.messages", "1").set("fetch.queue.backoff.ms", fetch_interval.as_millis().to_string());
        let mut reader = Self::create(settings, partitions, start)?;
        reader.wakeups = Some(notifications.subscribe(wakeups::CHANNEL));
        reader.sweep_every = SWEEP_WITH_WAKEUPS;
        Ok(reader)
    }

    fn create(
        mut settings: ClientConfig,
        partitions: Vec<PartitionKey>,
        start: &BTreeMap<PartitionKey, i64>,
    ) -> anyhow::Result<Self> {
        let queries = settings.create().context("failed to create a Kafka query client")?;
        let watermarks = WatermarkContext::default();
        let consumer: StreamConsumer<WatermarkContext> = settings
            .set("group.id", "keel-reader")
            .set("statistics.interval.ms", "1000")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Partitions are fetched only when records are known to be there, so a held fetch is
            // rare; when one is held, a broker that answers it only when this runs out adds half
            // of it to the record's latency.
            .set("fetch.wait.max.ms", "50")
            .create_with_context(watermarks.clone())
            .context("failed to create a Kafka reader")?;
        let cursors = partitions
            .iter()
            .map(|key| {
                let next = start.get(key).copied().unwrap_or(0).max(0);
                (key.clone(), Cursor { next, end: next, fetching: Fetching::Unassigned })
            })
            .collect();
        Ok(Self {
            consumer,
            queries: Arc::new(queries),
            watermarks,
            assigned: partitions,
            cursors,
            wakeups: None,
            sweep_every: SWEEP_WITHOUT_WAKEUPS,
            next_sweep: None,
            until: None,
            returned_at: None,
        })
    }

    /// Makes this reader stop at the current end of the log: [`Self::next`] returns `None` once
    /// every assigned partition has been read up to its high watermark as of now.
    pub async fn until_current_end(mut self, start: &BTreeMap<i32, i64>) -> anyhow::Result<Self> {
        let start: BTreeMap<PartitionKey, i64> =
            self.assigned.iter().filter_map(|key| start.get(&key.1).map(|offset| (key.clone(), *offset))).collect();
        self.until = Some(self.remaining(&start).await?);
        Ok(self)
    }

    /// Per partition whose high watermark lies beyond `start` (absent: the low watermark), that
    /// high watermark. The reader fetches up to it.
    pub async fn remaining(
        &mut self,
        start: &BTreeMap<PartitionKey, i64>,
    ) -> anyhow::Result<BTreeMap<PartitionKey, i64>> {
        let ends = self.sweep().await?;
        let mut remaining = BTreeMap::new();
        for key in &self.assigned {
            let Some((low, high)) = ends.get(key).copied() else { continue };
            let from = start.get(key).copied().unwrap_or(low).max(low);
            if from < high {
                remaining.insert(key.clone(), high);
            }
        }
        Ok(remaining)
    }

    /// The low and high watermarks of one partition, asked of the broker.
    pub async fn watermarks(&self, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
        let (queries, name) = (self.queries.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || queries.fetch_watermarks(&name, partition, QUERY_TIMEOUT))
            .await?
            .with_context(|| format!("failed to fetch watermarks of {topic}/{partition}"))
    }

    /// The high watermark of a partition as this reader last learnt it (from a sweep, an
    /// announcement or the client's statistics); no request to the broker.
    pub fn cached_high_watermark(&self, topic: &str, partition: i32) -> Option<i64> {
        let key = (topic.to_owned(), partition);
        let reported =
            self.watermarks.high.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key).copied();
        let known = self.cursors.get(&key).map(|cursor| cursor.end);
        reported.max(known)
    }

    pub fn assigned(&self) -> &[PartitionKey] {
        &self.assigned
    }

    /// The next record, or `None` when a bounded read is complete.
    pub async fn next(&mut self) -> anyhow::Result<Option<OwnedMessage>> {
        if let Some(returned_at) = self.returned_at.take() {
            let away = returned_at.elapsed();
            for cursor in self.cursors.values_mut() {
                if let Fetching::Active { since } = &mut cursor.fetching {
                    *since += away;
                }
            }
        }
        let next = self.next_record().await;
        self.returned_at = Some(Instant::now());
        next
    }

    async fn next_record(&mut self) -> anyhow::Result<Option<OwnedMessage>> {
        loop {
            if self.until.as_ref().is_some_and(|until| self.reached(until)) {
                return Ok(None);
            }
            if self.next_sweep.is_none_or(|due| Instant::now() >= due)
                && let Err(error) = self.sweep().await
            {
                // The broker may be back by the next one; meanwhile announcements still work.
                tracing::warn!(error = %format!("{error:#}"), "failed to sweep the watermarks");
                self.next_sweep = Some(Instant::now() + SWEEP_WITHOUT_WAKEUPS);
            }
            self.learn_from_statistics();
            self.steer()?;
            let fetching = self.cursors.values().any(|cursor| matches!(cursor.fetching, Fetching::Active { .. }));
            let sweep_at = self.next_sweep.unwrap_or_else(Instant::now);
            let stall_at = self.stall_deadline();
            tokio::select! {
                message = self.consumer.recv(), if fetching => {
                    let message = message.context("failed to read from Kafka")?.detach();
                    if let Some(message) = self.accept(message) {
                        return Ok(Some(message));
                    }
                }
                heard = recv_heard(&mut self.wakeups) => self.hear(heard),
                () = tokio::time::sleep_until(sweep_at.min(stall_at)) => self.drop_stalled()?,
            }
        }
    }

    /// Whether a bounded read has reached `until` everywhere.
    fn reached(&self, until: &BTreeMap<PartitionKey, i64>) -> bool {
        until.iter().all(|(key, end)| self.cursors.get(key).is_none_or(|cursor| cursor.next >= *end))
    }

    /// Takes a record from the client, unless it is one the reader already handed out (a
    /// message fetched before its partition was handed back, the client may still deliver).
    fn accept(&mut self, message: OwnedMessage) -> Option<OwnedMessage> {
        let key = (message.topic().to_owned(), message.partition());
        let cursor = self.cursors.get_mut(&key)?;
        if message.offset() < cursor.next {
            return None;
        }
        cursor.next = message.offset() + 1;
        cursor.end = cursor.end.max(cursor.next);
        if let Fetching::Active { since } = &mut cursor.fetching {
            *since = Instant::now();
        }
        Some(message)
    }

    fn hear(&mut self, heard: Option<Notice>) {
        match heard {
            Some(Notice::Payload(payload)) => {
                for end in wakeups::heard(&payload) {
                    if let Some(cursor) = self.cursors.get_mut(&(end.topic, end.partition)) {
                        cursor.end = cursor.end.max(end.end);
                    }
                }
            }
            Some(Notice::Missed) => self.next_sweep = None,
            // The process stopped listening: sweeping is all that is left.
            None => {
                self.wakeups = None;
                self.sweep_every = SWEEP_WITHOUT_WAKEUPS;
            }
        }
    }

    fn learn_from_statistics(&mut self) {
        let high = self.watermarks.high.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, cursor) in &mut self.cursors {
            if let Some(high) = high.get(key) {
                cursor.end = cursor.end.max(*high);
            }
        }
    }

    /// Fetches the partitions that are behind, hands back the ones that caught up.
    fn steer(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut assign = TopicPartitionList::new();
        let mut unassign = TopicPartitionList::new();
        let limit = self.until.clone();
        for ((topic, partition), cursor) in &mut self.cursors {
            let bounded_end = limit.as_ref().map(|until| until.get(&(topic.clone(), *partition)).copied().unwrap_or(0));
            let wanted = cursor.behind() && bounded_end.is_none_or(|end| cursor.next < end);
            match (cursor.fetching, wanted) {
                (Fetching::Unassigned, true) => {
                    assign.add_partition_offset(topic, *partition, Offset::Offset(cursor.next))?;
                    cursor.fetching = Fetching::Active { since: now };
                }
                (Fetching::Active { .. }, false) => {
                    unassign.add_partition(topic, *partition);
                    cursor.fetching = Fetching::Unassigned;
                }
                _ => {}
            }
        }
        if unassign.count() > 0 {
            self.consumer.incremental_unassign(&unassign).context("failed to unassign partitions")?;
        }
        if assign.count() > 0 {
            self.consumer.incremental_assign(&assign).context("failed to assign partitions")?;
        }
        Ok(())
    }

    fn stall_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        self.cursors
            .values()
            .filter_map(|cursor| match cursor.fetching {
                Fetching::Active { since } => Some(since + STALL),
                _ => None,
            })
            .min()
            .unwrap_or(far)
    }

    /// Hands back partitions fetched for [`STALL`] without a record, forgetting the end that
    /// made the reader fetch them; the sweep that follows says where they really end.
    fn drop_stalled(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut unassign = TopicPartitionList::new();
        for ((topic, partition), cursor) in &mut self.cursors {
            if let Fetching::Active { since } = cursor.fetching
                && now >= since + STALL
            {
                tracing::debug!(
                    topic,
                    partition,
                    next = cursor.next,
                    end = cursor.end,
                    "no record where one was expected"
                );
                unassign.add_partition(topic, *partition);
                cursor.fetching = Fetching::Unassigned;
                cursor.end = cursor.next;
                self.next_sweep = None;
            }
        }
        if unassign.count() > 0 {
            self.consumer.incremental_unassign(&unassign).context("failed to unassign partitions")?;
        }
        Ok(())
    }

    /// Asks the broker where every partition begins and ends (two requests, whatever the number
    /// of partitions), and moves known ends there.
    async fn sweep(&mut self) -> anyhow::Result<BTreeMap<PartitionKey, (i64, i64)>> {
        let mut query = TopicPartitionList::new();
        for (topic, partition) in &self.assigned {
            query.add_partition(topic, *partition);
        }
        let queries = self.queries.clone();
        let started = std::time::Instant::now();
        let ends = tokio::task::spawn_blocking(move || list_offsets(&queries, &query)).await??;
        metrics::histogram!("keel_reader_sweep_seconds").record(started.elapsed().as_secs_f64());
        for (key, (low, high)) in &ends {
            if let Some(cursor) = self.cursors.get_mut(key) {
                // Records before the low watermark are gone (retention): read from where they start.
                if cursor.next < *low && !matches!(cursor.fetching, Fetching::Active { .. }) {
                    cursor.next = *low;
                }
                cursor.end = cursor.end.max(*high);
            }
        }
        self.next_sweep = Some(Instant::now() + self.sweep_every);
        Ok(ends)
    }
}

/// The low and high watermark of every partition of `partitions`, by `ListOffsets`.
fn list_offsets(
    client: &BaseConsumer,
    partitions: &TopicPartitionList,
) -> anyhow::Result<BTreeMap<PartitionKey, (i64, i64)>> {
    let at = |offset: Offset| -> anyhow::Result<TopicPartitionList> {
        let mut query = TopicPartitionList::new();
        for element in partitions.elements() {
            query.add_partition_offset(element.topic(), element.partition(), offset)?;
        }
        // A "timestamp" of -2 / -1 asks for the earliest / latest offset.
        client.offsets_for_times(query, QUERY_TIMEOUT).context("failed to list offsets")
    };
    let (low, high) = (at(Offset::Beginning)?, at(Offset::End)?);
    let offset_of = |list: &TopicPartitionList, topic: &str, partition: i32| -> anyhow::Result<i64> {
        let element = list.find_partition(topic, partition).context("the broker left a partition out")?;
        element.error().with_context(|| format!("failed to list offsets of {topic}/{partition}"))?;
        match element.offset() {
            Offset::Offset(offset) => Ok(offset),
            other => anyhow::bail!("no offset for {topic}/{partition}: {other:?}"),
        }
    };
    partitions
        .elements()
        .iter()
        .map(|element| {
            let (topic, partition) = (element.topic(), element.partition());
            Ok((
                (topic.to_owned(), partition),
                (offset_of(&low, topic, partition)?, offset_of(&high, topic, partition)?),
            ))
        })
        .collect()
}

async fn recv_heard(wakeups: &mut Option<broadcast::Receiver<Notice>>) -> Option<Notice> {
    let Some(receiver) = wakeups else { return std::future::pending().await };
    match receiver.recv().await {
        Ok(notice) => Some(notice),
        Err(broadcast::error::RecvError::Lagged(_)) => Some(Notice::Missed),
        Err(broadcast::error::RecvError::Closed) => None,
    }
}
