//! One broker consumer per gateway and topic, shared by every subscriber of the topic.
//!
//! A hub reads every partition of its topic, applies the shared validation rule to each commit
//! (a stream never shows a commit that readers skip), turns the events of valid commits into
//! [`StreamEvent`]s, and offers each to the subscribers that want it without ever waiting: a
//! subscriber whose bounded buffer is full is cut off (and told where to resume) rather than
//! slowing the hub and everyone else.
//!
//! The hub starts from the audit projection's checkpoints and validation state (read together,
//! in one snapshot), so it knows every aggregate's version without reading the topic from the
//! start; what lies before its position is the audit log's to serve ([`super::history`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use chrono::SecondsFormat;
use keel_runtime::{KafkaConfig, notifications::Notifications};
use keel_topics::{
    SchemaRegistryCodec, StreamState, Topic, TopicNames, Verdict, avro_json,
    reader::PartitionReader,
    record::{self, Record},
};
use rdkafka::message::Message;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::cursor::Position;

/// One event as streams show it (the audit log's view of it: sensitive fields redacted).
#[derive(Debug)]
pub struct StreamEvent {
    pub topic: Topic,
    pub partition: i32,
    pub position: Position,
    pub aggregate_id: Uuid,
    pub event_type: String,
    /// The event as JSON, made once for every subscriber.
    pub json: String,
}

/// The JSON of a streamed event: the audit log's fields (without its hash chain).
#[derive(Debug, serde::Serialize)]
pub struct EventView<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub event_index: i32,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub schema_version: i64,
    pub aggregate_id: Uuid,
    pub aggregate_version: i64,
    pub command_id: Uuid,
    pub actor: &'a str,
    pub occurred_at: String,
    pub correlation_id: Uuid,
    pub trace_id: Option<&'a str>,
    pub payload: &'a serde_json::Value,
}

impl EventView<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event view serializes")
    }
}

/// What a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub aggregate: Option<Uuid>,
    /// Event types (`UserRegistered`); `None`: every type.
    pub types: Option<HashSet<String>>,
}

impl Filter {
    pub fn wants(&self, aggregate_id: Uuid, event_type: &str) -> bool {
        self.aggregate.is_none_or(|aggregate| aggregate == aggregate_id)
            && self.types.as_ref().is_none_or(|types| types.contains(event_type))
    }
}

/// A subscriber as hubs see it. One subscriber may listen to several hubs (the audit stream):
/// they share its buffer and its cut-off signal.
#[derive(Clone)]
pub struct Subscriber {
    pub filter: Arc<Filter>,
    pub sender: mpsc::Sender<Arc<StreamEvent>>,
    /// Cancelled when a hub found the buffer full: the subscriber stops at what it received.
    pub cut: CancellationToken,
}

struct Registration {
    subscriber: Subscriber,
    /// Per partition, the first position this subscriber takes from the hub.
    from: Vec<Position>,
}

impl Registration {
    /// Whether its stream is over: cut off, or the client left.
    fn ended(&self) -> bool {
        self.subscriber.cut.is_cancelled() || self.subscriber.sender.is_closed()
    }
}

struct State {
    /// Per partition, the next offset the hub reads.
    head: Vec<i64>,
    registrations: Vec<Registration>,
}

pub struct Hub {
    topic: Topic,
    /// The full name (with the installation's prefix), as events name it.
    topic_name: String,
    partitions: i32,
    state: Mutex<State>,
    /// False once the reading task has ended (shutdown, or a panic): the hub takes no more
    /// subscribers and the next stream of its topic starts a new one.
    running: AtomicBool,
}

/// Ends a hub's subscriptions when its reading task ends, however it ends: every stream then
/// receives its final event (with its resume position) instead of silence. They are cut, as a
/// full buffer would cut them, since a subscriber of several hubs (the audit stream) would
/// otherwise go on without this one's events.
struct Stopped(Arc<Hub>);

impl Drop for Stopped {
    fn drop(&mut self) {
        let hub = &self.0;
        hub.running.store(false, Ordering::Release);
        let mut state = hub.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let dropped = state.registrations.len();
        for registration in state.registrations.drain(..) {
            registration.subscriber.cut.cancel();
        }
        hub.count_subscriptions(-(dropped as f64));
    }
}

/// What hubs need to start.
#[derive(Clone)]
pub struct HubContext {
    pub kafka: KafkaConfig,
    pub names: TopicNames,
    pub codec: SchemaRegistryCodec,
    pub pool: PgPool,
    pub shutdown: CancellationToken,
    /// Where the writers' announcements are heard, so that an idle hub fetches nothing.
    pub notifications: Notifications,
}

impl HubContext {
    /// A live reader of every partition of `topic`, from `head` (the next offset per partition).
    fn reader(&self, topic: &str, partitions: i32, head: &[i64]) -> anyhow::Result<PartitionReader> {
        let keys = (0..partitions).map(|partition| (topic.to_owned(), partition)).collect();
        let start =
            by_partition(head).into_iter().map(|(partition, offset)| ((topic.to_owned(), partition), offset)).collect();
        PartitionReader::live(&self.kafka, keys, &start, &self.notifications, keel_topics::reader::LIVE_FETCH_INTERVAL)
    }
}

impl Hub {
    /// Starts the hub of `topic`: loads its starting point, then reads until shutdown. A broker
    /// failure does not stop it: it reassigns from where it was, with backoff.
    pub async fn start(context: &HubContext, topic: Topic) -> anyhow::Result<Arc<Self>> {
        let topic_name = context.names.name(topic);
        let partitions = topic.spec().partitions;
        // Where the audit log is: events before it come from the audit log, the rest live.
        let (head, mut streams) =
            keel_projections::live_position(&context.pool, "audit", &topic_name, partitions).await?;
        let mut reader = Some(context.reader(&topic_name, partitions, &head)?);
        tracing::info!(topic = %topic_name, aggregates = streams.len(), "stream hub starting");
        let hub = Arc::new(Self {
            topic,
            topic_name: topic_name.clone(),
            partitions,
            state: Mutex::new(State { head, registrations: Vec::new() }),
            running: AtomicBool::new(true),
        });
        let (task_hub, context) = (hub.clone(), context.clone());
        tokio::spawn(async move {
            // Ends the subscriptions however the task ends, a panic included.
            let _stopped = Stopped(task_hub.clone());
            let mut backoff = Duration::from_millis(200);
            while !context.shutdown.is_cancelled() {
                let assigned = match reader.take() {
                    Some(reader) => Ok(reader),
                    None => context.reader(&topic_name, partitions, &task_hub.head()),
                };
                let outcome = match assigned {
                    Ok(reader) => task_hub.read(reader, &context.codec, &mut streams, &context.shutdown).await,
                    Err(error) => Err(error),
                };
                let Err(error) = outcome else { break };
                tracing::error!(topic = %topic_name, error = %format!("{error:#}"), "a stream hub's read failed; resuming");
                tokio::select! {
                    () = context.shutdown.cancelled() => {}
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        });
        Ok(hub)
    }

    /// Per partition, the next offset the hub reads.
    fn head(&self) -> Vec<i64> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).head.clone()
    }

    /// Moves `keel_stream_subscriptions` of this hub's topic by `change`.
    fn count_subscriptions(&self, change: f64) {
        if change != 0.0 {
            metrics::gauge!("keel_stream_subscriptions", "topic" => self.topic.spec().base_name).increment(change);
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    pub fn topic(&self) -> Topic {
        self.topic
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Registers `subscriber` for the positions from `from` (per partition) on, and returns the
    /// hub's head at that moment: what lies before it the hub will not send.
    pub fn subscribe(&self, subscriber: Subscriber, from: Vec<Position>) -> Vec<i64> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let from = from.iter().zip(&state.head).map(|(from, head)| (*from).max(Position::at_offset(*head))).collect();
        // Streams that ended since this topic's last record are let go here too, so a quiet
        // topic does not keep them.
        let before = state.registrations.len();
        state.registrations.retain(|registration| !registration.ended());
        self.count_subscriptions(-((before - state.registrations.len()) as f64));
        // A hub that stopped cuts the subscriber at once, as it cut those it had.
        if self.is_running() {
            state.registrations.push(Registration { subscriber, from });
            self.count_subscriptions(1.0);
        } else {
            subscriber.cut.cancel();
        }
        state.head.clone()
    }

    /// Reads until shutdown (`Ok`) or a broker failure (`Err`).
    async fn read(
        &self,
        mut reader: PartitionReader,
        codec: &SchemaRegistryCodec,
        streams: &mut HashMap<Uuid, StreamState>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                message = reader.next() => message?.context("a live read has no end")?,
            };
            let mut backoff = Duration::from_millis(100);
            let read = loop {
                match record::read(codec, self.topic, &message).await {
                    Ok(read) => break read,
                    // The registry cannot answer: nothing is known of the record yet.
                    Err(error) => {
                        tracing::warn!(topic = %self.topic, %error, "cannot decode a record for streams yet; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            let (partition, offset) = (message.partition(), message.offset());
            let events = match read {
                Record::Commit { header, decoded } => {
                    match streams.entry(header.aggregate_id).or_default().admit(&header) {
                        Verdict::Valid => self.events(partition, offset, &header, &decoded),
                        _ => Vec::new(),
                    }
                }
                Record::Unreadable { .. } => Vec::new(),
            };
            self.offer(partition, offset, events);
            // A burst of records already fetched does not starve the subscribers' tasks.
            tokio::task::yield_now().await;
        }
    }

    fn events(
        &self,
        partition: i32,
        offset: i64,
        header: &keel_topics::CommitHeader,
        decoded: &keel_topics::Decoded,
    ) -> Vec<Arc<StreamEvent>> {
        let occurred_at = header.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let trace_id = header.trace_id();
        header
            .events
            .iter()
            .zip(&decoded.events)
            .enumerate()
            .map(|(index, (meta, event))| {
                let payload = avro_json::redacted(event);
                let view = EventView {
                    topic: &self.topic_name,
                    partition,
                    offset,
                    event_index: index as i32,
                    event_id: meta.event_id,
                    event_type: &meta.event_type,
                    schema_version: i64::from(meta.schema_version),
                    aggregate_id: header.aggregate_id,
                    aggregate_version: (header.expected_version + index as u64 + 1) as i64,
                    command_id: header.command_id,
                    actor: &header.actor,
                    occurred_at: occurred_at.clone(),
                    correlation_id: header.correlation_id,
                    trace_id: trace_id.as_deref(),
                    payload: &payload,
                };
                Arc::new(StreamEvent {
                    topic: self.topic,
                    partition,
                    position: Position { offset, event_index: index as i32 },
                    aggregate_id: header.aggregate_id,
                    event_type: meta.event_type.clone(),
                    json: view.to_json(),
                })
            })
            .collect()
    }

    /// Hands the events of the record at `offset` to every subscriber that wants them, without
    /// waiting; a full buffer cuts its subscriber off, a closed one (the client left) drops it.
    fn offer(&self, partition: i32, offset: i64, events: Vec<Arc<StreamEvent>>) {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.head[partition as usize] = offset + 1;
        let before = state.registrations.len();
        state.registrations.retain(|registration| {
            if registration.ended() {
                return false;
            }
            let subscriber = &registration.subscriber;
            for event in &events {
                if event.position < registration.from[partition as usize]
                    || !subscriber.filter.wants(event.aggregate_id, &event.event_type)
                {
                    continue;
                }
                match subscriber.sender.try_send(event.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics::counter!("keel_stream_cut_total", "topic" => self.topic.spec().base_name).increment(1);
                        subscriber.cut.cancel();
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            true
        });
        self.count_subscriptions(-((before - state.registrations.len()) as f64));
        if !events.is_empty() {
            metrics::counter!("keel_stream_events_total", "topic" => self.topic.spec().base_name)
                .increment(events.len() as u64);
        }
    }
}

fn by_partition(head: &[i64]) -> BTreeMap<i32, i64> {
    head.iter().enumerate().map(|(partition, offset)| (partition as i32, *offset)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Arc<Hub> {
        Arc::new(Hub {
            topic: Topic::BlogPosts,
            topic_name: "blog.posts".into(),
            partitions: 1,
            state: Mutex::new(State { head: vec![0], registrations: Vec::new() }),
            running: AtomicBool::new(true),
        })
    }

    fn subscriber(buffer: usize) -> (Subscriber, mpsc::Receiver<Arc<StreamEvent>>) {
        let (sender, receiver) = mpsc::channel(buffer);
        let filter = Arc::new(Filter { aggregate: None, types: None });
        (Subscriber { filter, sender, cut: CancellationToken::new() }, receiver)
    }

    fn event(offset: i64) -> Arc<StreamEvent> {
        Arc::new(StreamEvent {
            topic: Topic::BlogPosts,
            partition: 0,
            position: Position::at_offset(offset),
            aggregate_id: Uuid::nil(),
            event_type: "PostDrafted".into(),
            json: "{}".into(),
        })
    }

    #[test]
    fn a_full_buffer_cuts_only_its_subscriber() {
        let hub = hub();
        let (slow, _slow_events) = subscriber(1);
        let (fast, mut fast_events) = subscriber(8);
        hub.subscribe(slow.clone(), vec![Position::START]);
        hub.subscribe(fast.clone(), vec![Position::START]);
        for offset in 0..3 {
            hub.offer(0, offset, vec![event(offset)]);
        }
        assert!(slow.cut.is_cancelled());
        assert!(!fast.cut.is_cancelled());
        let offsets: Vec<i64> = std::iter::from_fn(|| fast_events.try_recv().ok()).map(|e| e.position.offset).collect();
        assert_eq!(offsets, [0, 1, 2]);
        assert_eq!(hub.head(), [3]);
    }

    #[test]
    fn a_stopped_hub_cuts_its_subscribers_and_takes_no_more() {
        let hub = hub();
        let (before, _events) = subscriber(8);
        hub.subscribe(before.clone(), vec![Position::START]);
        drop(Stopped(hub.clone()));
        assert!(!hub.is_running());
        assert!(before.cut.is_cancelled());
        let (after, _events) = subscriber(8);
        hub.subscribe(after.clone(), vec![Position::START]);
        assert!(after.cut.is_cancelled());
        assert!(hub.state.lock().unwrap().registrations.is_empty());
    }
}
