//! The write path every command service shares.
//!
//! Instances of a service split the partitions of its topic through a consumer group
//! ([`keel_topics::membership`]). For each partition it owns, an instance runs one
//! [`writer::PartitionWriter`]: it loads the partition (snapshot, then the tail of the log),
//! then decides queued commands in batches and acknowledges each one only once its commit is
//! acknowledged by the broker and valid by the shared rule. A command for a partition owned
//! elsewhere is forwarded to the owner, whose endpoint the [`owners::OwnerDirectory`] knows.
//! Queues are bounded per partition: a full queue is `Overloaded`, never unbounded memory.

mod owners;
mod partition;
mod snapshots;
mod writer;

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use anyhow::Context;
use apache_avro::types::Value;
use keel_domain::{Aggregate, DomainError, DomainEvent};
use keel_runtime::{KafkaConfig, ReadinessCheck};
use keel_topics::{
    CodecError, CommitHeader, Decoded, SchemaRegistryCodec, Topic, kafka, membership::Membership, partitioning,
    producer::Producer, wakeups::Announcer,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::{Serialize, de::DeserializeOwned};
use sqlx::PgPool;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use owners::OwnerDirectory;
use snapshots::SnapshotStore;
use writer::PartitionWriter;

use crate::{Accepted, CommandError, CommandMeta};

/// What the shared write path needs to know about one aggregate type: its commands, events and
/// state, how a command is decided, and how its commits look on the wire.
pub trait Model: Send + Sync + 'static {
    type State: Aggregate<Event = Self::Event, Command = Self::Command>
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static;
    type Command: Clone + Send + Sync + 'static;
    type Event: DomainEvent + Send + Sync + 'static;
    /// Lookups across the aggregates of a partition that decisions need. It includes commits
    /// still in flight (the writer decides on a speculative state, and a command waits only for
    /// its own aggregate's commits), so a decision must not let an entry of another aggregate
    /// make it valid: the rule would not catch a void commit behind the entry.
    type Index: Default + Send + Sync + 'static;

    const TOPIC: Topic;
    /// The service's name in metrics.
    const SERVICE: &'static str;

    /// The commit value of one command's events, sealed where the topic seals personal data
    /// (see [`keel_topics::sealing`]), and whether it was sealed.
    fn encode(
        &self,
        aggregate_id: Uuid,
        events: &[Self::Event],
    ) -> impl Future<Output = Result<(Value, bool), CodecError>> + Send;

    /// The domain events of a decoded commit. A retriable error means "not now" (the schema
    /// registry or the key store is down); any other means the commit is unreadable.
    fn decode(
        &self,
        header: &CommitHeader,
        decoded: Decoded,
    ) -> impl Future<Output = Result<Vec<Self::Event>, CodecError>> + Send;

    /// Decides `command` against its aggregate's state and the partition's index: the events it
    /// produces, or the domain's refusal. Pure; it may run more than once (when the state turns
    /// out to lag the log, the command is decided again after catching up). By default the
    /// aggregate decides alone.
    fn decide(
        state: &Self::State,
        _index: &Self::Index,
        command: &Self::Command,
    ) -> Result<Vec<Self::Event>, DomainError> {
        state.decide(command.clone()).map_err(Into::into)
    }

    /// Keeps the index in step with an aggregate that changed from `before` to `after`.
    fn reindex(_index: &mut Self::Index, _id: Uuid, _before: &Self::State, _after: &Self::State) {}

    /// Whether an event must reach the snapshot store at once rather than with the next regular
    /// snapshot (an erasure: the snapshot row must not keep what the event erased).
    fn snapshot_at_once(_event: &Self::Event) -> bool {
        false
    }
}

/// What a request asks of a partition's writer.
pub enum Action<C> {
    /// Decide this command.
    Decide(C),
    /// Answer with the aggregate's current state, appending nothing.
    Read,
}

/// A command for the engine (or, made by [`Engine::read`], a read).
pub struct Command<M: Model> {
    aggregate_id: Uuid,
    /// The version the caller decided against (`If-Match`); `None`: the current one.
    expected_version: Option<u64>,
    meta: CommandMeta,
    /// The command's name in metrics.
    name: &'static str,
    action: Action<M::Command>,
}

impl<M: Model> Command<M> {
    pub fn new(aggregate_id: Uuid, meta: CommandMeta, name: &'static str, command: M::Command) -> Self {
        Self { aggregate_id, expected_version: None, meta, name, action: Action::Decide(command) }
    }

    /// Only against this version of the aggregate (`If-Match`), if given.
    pub fn expecting(self, expected_version: Option<u64>) -> Self {
        Self { expected_version, ..self }
    }
}

/// A command queued for a partition's writer.
pub struct Request<M: Model> {
    pub aggregate_id: Uuid,
    pub expected_version: Option<u64>,
    pub meta: CommandMeta,
    pub action: Action<M::Command>,
    /// After it, the caller has given up: the command is not decided any more (so no command
    /// takes effect long after its caller stopped waiting).
    pub deadline: Instant,
    pub reply: Reply<M::State>,
}

/// What a command came to: its result, and its aggregate's state just after it.
#[derive(Debug, Clone)]
pub struct Outcome<S> {
    pub accepted: Accepted,
    pub state: S,
}

/// Where a command's outcome goes.
pub struct Reply<S> {
    sender: oneshot::Sender<Result<Outcome<S>, CommandError>>,
    received: Instant,
    service: &'static str,
    command: &'static str,
}

impl<S> Reply<S> {
    /// Counts and times the outcome, then hands it to the caller (who may have given up: its
    /// outcome stands in the log either way).
    pub(crate) fn send(self, outcome: Result<Outcome<S>, CommandError>) {
        let label = match &outcome {
            Ok(outcome) if outcome.accepted.replayed => "replayed",
            Ok(_) => "accepted",
            Err(error) => error.code().slug(),
        };
        metrics::counter!("keel_commands_total", "service" => self.service, "command" => self.command, "outcome" => label)
            .increment(1);
        metrics::histogram!("keel_command_duration_seconds", "service" => self.service, "command" => self.command)
            .record(self.received.elapsed().as_secs_f64());
        let _ = self.sender.send(outcome);
    }

    pub(crate) fn fail(self, error: CommandError) {
        self.send(Err(error));
    }
}

/// Tuning of the write path.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Commands waiting per partition; beyond it callers get `Overloaded`.
    pub queue_capacity: usize,
    /// Most commands decided together (batches are also produced while earlier ones are in
    /// flight).
    pub max_batch: usize,
    /// Records applied between two snapshots of a partition.
    pub snapshot_every: u64,
    /// How long a caller waits for its outcome.
    pub command_timeout: Duration,
}

/// How an instance comes to own partitions.
pub enum Ownership {
    /// Through a consumer group shared with the other instances: the normal way.
    Group,
    /// Every partition, whatever the others do. Test-only: it makes this instance a zombie that
    /// writes beside the real owners, to show that readers still agree.
    UnsafeAll,
}

/// What the engines of one service instance share.
#[derive(Clone)]
pub struct EngineContext {
    pub kafka: KafkaConfig,
    pub codec: SchemaRegistryCodec,
    pub pool: PgPool,
    /// Where other instances reach this one to forward commands.
    pub endpoint: String,
    pub settings: Settings,
    /// Tells readers where partitions end once commits are acknowledged.
    pub announcer: Announcer,
    pub producers: Arc<CommitProducers>,
    /// The partitions this instance writes, for its registration.
    pub partitions: keel_discovery::Partitions,
}

/// The producers the writers of a service instance append with, each replaced when it fails
/// fatally. Each producer is one broker connection with one request in flight; a broker that
/// serves a connection's requests one at a time (nisshi does, writing each partition of a
/// request in turn) answers sooner when partitions spread over a few connections.
pub struct CommitProducers {
    kafka: KafkaConfig,
    producers: Vec<Mutex<Arc<Producer>>>,
}

impl CommitProducers {
    /// `count` producers (at least one).
    pub fn new(kafka: &KafkaConfig, count: usize) -> anyhow::Result<Self> {
        let producers = (0..count.max(1))
            .map(|_| Ok(Mutex::new(Arc::new(Producer::commits(kafka)?))))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { kafka: kafka.clone(), producers })
    }

    fn slot(&self, partition: i32) -> &Mutex<Arc<Producer>> {
        &self.producers[partition.unsigned_abs() as usize % self.producers.len()]
    }

    /// The producer of `partition`: always the same one, so the partition's commits keep their
    /// order.
    fn of(&self, partition: i32) -> Arc<Producer> {
        self.slot(partition).lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// An idempotent producer that hit a fatal error (e.g. `OutOfOrderSequenceNumber`) refuses
    /// every later record: replace it. The writers read their partitions back before trusting
    /// their state again.
    fn replace_if_fatal(&self, partition: i32) {
        let mut current = self.slot(partition).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((code, reason)) = current.fatal_error() else { return };
        tracing::error!(code = ?code, reason = %reason, "the producer failed fatally; replacing it");
        metrics::counter!("keel_producer_replacements_total").increment(1);
        match Producer::commits(&self.kafka) {
            Ok(replacement) => *current = Arc::new(replacement),
            Err(error) => tracing::error!(error = %format!("{error:#}"), "failed to create a new producer"),
        }
    }
}

/// What every partition writer of an engine shares.
struct Shared {
    kafka: KafkaConfig,
    topic: String,
    codec: SchemaRegistryCodec,
    producers: Arc<CommitProducers>,
    /// Watermark queries, on a client of their own.
    queries: Arc<BaseConsumer>,
    snapshots: SnapshotStore,
    settings: Settings,
    announcer: Announcer,
}

impl Shared {
    /// The end of a partition as the broker sees it now.
    async fn high_watermark(&self, partition: i32) -> anyhow::Result<i64> {
        let (queries, topic) = (self.queries.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || queries.fetch_watermarks(&topic, partition, Duration::from_secs(5)))
            .await?
            .map(|(_, high)| high)
            .with_context(|| format!("failed to fetch the high watermark of partition {partition}"))
    }

    fn producer(&self, partition: i32) -> Arc<Producer> {
        self.producers.of(partition)
    }

    fn replace_producer_if_fatal(&self, partition: i32) {
        self.producers.replace_if_fatal(partition);
    }
}

/// Where a command goes.
pub enum Dispatch<S> {
    /// This instance owns the partition and decided the command.
    Done(Result<Outcome<S>, CommandError>),
    /// Another instance owns the partition: forward the command to its endpoint.
    Forward(String),
}

/// Who serves an aggregate's partition.
pub enum Location {
    Here,
    /// Another instance, at this endpoint.
    There(String),
    /// Nobody right now (a move in progress): retry.
    Nowhere(CommandError),
}

/// The write path of one service in this instance.
pub struct Engine<M: Model> {
    model: Arc<M>,
    shared: Arc<Shared>,
    partitions: i32,
    /// The partitions this instance owns and serves, with their writers' queues.
    writers: RwLock<HashMap<i32, mpsc::Sender<Request<M>>>>,
    /// The partitions assigned to this instance (`None` before the first assignment).
    assigned: RwLock<Option<BTreeSet<i32>>>,
    owners: OwnerDirectory,
}

impl<M: Model> Engine<M> {
    /// Registers the topic's schema and sizes the topic; nothing is owned until [`Self::serve`].
    pub async fn new(model: M, context: &EngineContext, topic: String) -> anyhow::Result<Self> {
        let schema_id = context.codec.register(M::TOPIC).await.context("failed to register the topic's schema")?;
        tracing::info!(topic = %topic, schema_id, "schema registered");
        let metadata = kafka::consumer(&context.kafka, "keel-commands-metadata")?;
        let partitions = kafka::partition_count(&metadata, &topic, Duration::from_secs(10)).await? as i32;
        let shared = Shared {
            kafka: context.kafka.clone(),
            topic: topic.clone(),
            codec: context.codec.clone(),
            producers: context.producers.clone(),
            queries: Arc::new(
                kafka::client_config(&context.kafka).create().context("failed to create a query client")?,
            ),
            snapshots: SnapshotStore::new(context.pool.clone(), topic.clone()),
            settings: context.settings.clone(),
            announcer: context.announcer.clone(),
        };
        Ok(Self {
            model: Arc::new(model),
            shared: Arc::new(shared),
            partitions,
            writers: RwLock::new(HashMap::new()),
            assigned: RwLock::new(None),
            owners: OwnerDirectory::new(
                context.pool.clone(),
                topic,
                context.endpoint.clone(),
                context.partitions.clone(),
            ),
        })
    }

    pub fn partition_of(&self, aggregate_id: Uuid) -> i32 {
        partitioning::partition_of(aggregate_id.to_string().as_bytes(), self.partitions)
    }

    /// The model this engine writes for.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Who serves `aggregate_id`'s partition: this instance, another one, or nobody right now.
    pub async fn locate(&self, aggregate_id: Uuid) -> Location {
        let partition = self.partition_of(aggregate_id);
        if self.writer(partition).is_some() {
            return Location::Here;
        }
        match self.owners.owner(partition).await {
            Ok(Some(endpoint)) if endpoint != self.owners.endpoint() => Location::There(endpoint),
            Ok(_) => Location::Nowhere(CommandError::Unavailable(format!(
                "partition {partition} has no owner right now; retry"
            ))),
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "failed to look up a partition owner");
                Location::Nowhere(CommandError::Unavailable("cannot find the partition's owner; retry".into()))
            }
        }
    }

    /// The partitions this instance owns and serves now.
    pub fn owned_partitions(&self) -> Vec<i32> {
        self.writers.read().unwrap_or_else(std::sync::PoisonError::into_inner).keys().copied().collect()
    }

    fn writer(&self, partition: i32) -> Option<mpsc::Sender<Request<M>>> {
        self.writers.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&partition).cloned()
    }

    /// Decides `command` here if this instance owns its partition, or says where to forward it.
    pub async fn dispatch(&self, command: Command<M>) -> Dispatch<M::State> {
        match self.locate(command.aggregate_id).await {
            Location::Here => match self.writer(self.partition_of(command.aggregate_id)) {
                Some(writer) => Dispatch::Done(self.execute(writer, command).await),
                None => Dispatch::Done(Err(CommandError::Unavailable("the partition is moving; retry".into()))),
            },
            Location::There(endpoint) => Dispatch::Forward(endpoint),
            Location::Nowhere(error) => Dispatch::Done(Err(error)),
        }
    }

    /// Runs `command` on this instance, which has just found that it serves the partition
    /// ([`Self::locate`]); should the partition move meanwhile, the caller retries.
    pub async fn run(&self, command: Command<M>) -> Result<Outcome<M::State>, CommandError> {
        match self.dispatch(command).await {
            Dispatch::Done(outcome) => outcome,
            Dispatch::Forward(_) => {
                Err(CommandError::Unavailable("the partition moved to another owner; retry".into()))
            }
        }
    }

    /// [`Self::read`] on this instance, like [`Self::run`].
    pub async fn read_here(&self, aggregate_id: Uuid) -> Result<Outcome<M::State>, CommandError> {
        match self.read(aggregate_id).await {
            Dispatch::Done(outcome) => outcome,
            Dispatch::Forward(_) => {
                Err(CommandError::Unavailable("the partition moved to another owner; retry".into()))
            }
        }
    }

    /// The current state and version of an aggregate, as its partition's owner knows it: read in
    /// turn with the commands queued before it, and only once the owner's state is as current as
    /// the log (like every answer that appends nothing).
    pub async fn read(&self, aggregate_id: Uuid) -> Dispatch<M::State> {
        let meta = CommandMeta {
            command_id: Uuid::new_v4(),
            actor: "system:read".into(),
            correlation_id: Uuid::nil(),
            traceparent: None,
        };
        let read = Command { aggregate_id, expected_version: None, meta, name: "Read", action: Action::Read };
        self.dispatch(read).await
    }

    async fn execute(
        &self,
        writer: mpsc::Sender<Request<M>>,
        command: Command<M>,
    ) -> Result<Outcome<M::State>, CommandError> {
        let Command { aggregate_id, expected_version, meta, name, action } = command;
        let (sender, outcome) = oneshot::channel();
        let received = Instant::now();
        let request = Request {
            aggregate_id,
            expected_version,
            meta,
            action,
            deadline: received + self.shared.settings.command_timeout,
            reply: Reply { sender, received, service: M::SERVICE, command: name },
        };
        writer.try_send(request).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => CommandError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => {
                CommandError::Unavailable("the partition is moving to another owner; retry".into())
            }
        })?;
        tokio::time::timeout(self.shared.settings.command_timeout, outcome)
            .await
            .map_err(|_| {
                CommandError::Unavailable("timed out waiting for the broker; retry with the same command id".into())
            })?
            .map_err(|_| CommandError::Unavailable("the partition's writer stopped; retry".into()))?
    }

    /// Serves the partitions `ownership` gives this instance until `shutdown`, loading each one
    /// before serving it and letting go of each one it loses.
    pub async fn serve(self: Arc<Self>, ownership: Ownership, shutdown: CancellationToken) -> anyhow::Result<()> {
        let membership = match ownership {
            Ownership::Group => {
                let group = format!("keel-writers.{}", self.shared.topic);
                Some(Membership::join(&self.shared.kafka, &group, std::slice::from_ref(&self.shared.topic))?)
            }
            Ownership::UnsafeAll => {
                tracing::warn!("writing to every partition regardless of ownership (test-only zombie mode)");
                None
            }
        };
        let mut changes = membership.as_ref().map(Membership::watch);
        // Per partition served here: how to revoke it, and its task.
        let mut running: HashMap<i32, (CancellationToken, tokio::task::Id)> = HashMap::new();
        let mut tasks = JoinSet::new();
        // Before the group's first rebalance, "nothing assigned" means "not yet", not "none".
        let mut rebalanced = membership.is_none();
        loop {
            let assigned: BTreeSet<i32> = match &membership {
                Some(membership) => membership.assigned().into_iter().map(|(_, partition)| partition).collect(),
                None => (0..self.partitions).collect(),
            };
            rebalanced |= !assigned.is_empty();
            if rebalanced {
                *self.assigned.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(assigned.clone());
            }
            running.retain(|partition, (revoked, _)| {
                let keep = assigned.contains(partition);
                if !keep {
                    self.writers.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(partition);
                    revoked.cancel();
                }
                keep
            });
            for partition in &assigned {
                if !running.contains_key(partition) {
                    let revoked = shutdown.child_token();
                    let task = tasks.spawn(self.clone().own(*partition, revoked.clone(), membership.is_some()));
                    running.insert(*partition, (revoked, task.id()));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = async {
                    match &mut changes {
                        Some(changes) => changes.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    changed.context("the group membership stopped")?;
                    rebalanced = true;
                }
                Some(finished) = tasks.join_next_with_id() => {
                    // A task that ends while its partition is still served here failed (a
                    // panic): forget the partition, and the next round loads it afresh.
                    let id = match &finished {
                        Ok((id, ())) => *id,
                        Err(error) => error.id(),
                    };
                    let failed = running.iter().find(|(_, (_, task))| *task == id).map(|(partition, _)| *partition);
                    if let Some(partition) = failed {
                        let partition_label = partition.to_string();
                        keel_runtime::errors::system(
                            "writer_stopped",
                            &format!(
                                "the writer of {}/{partition} ended ({:?}); reloading the partition",
                                self.shared.topic,
                                finished.err()
                            ),
                            &[("topic", &self.shared.topic), ("partition", &partition_label)],
                            None,
                        );
                        metrics::counter!("keel_command_partition_failures_total", "topic" => self.shared.topic.clone())
                            .increment(1);
                        self.writers.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&partition);
                        if let Some((revoked, _)) = running.remove(&partition) {
                            revoked.cancel();
                        }
                    }
                }
            }
        }
        self.writers.write().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        while tasks.join_next().await.is_some() {}
        drop(membership);
        Ok(())
    }

    /// Owns one partition until `revoked`: loads it (retrying while it stays assigned), then
    /// serves it, announcing itself as the owner while it does.
    async fn own(self: Arc<Self>, partition: i32, revoked: CancellationToken, announce: bool) {
        let mut backoff = Duration::from_millis(200);
        let writer = loop {
            let load = PartitionWriter::<M>::load(self.model.clone(), self.shared.clone(), partition);
            tokio::select! {
                () = revoked.cancelled() => return,
                loaded = load => match loaded {
                    Ok(writer) => break writer,
                    Err(error) => {
                        tracing::error!(partition, error = %format!("{error:#}"), "failed to load a partition; retrying");
                        tokio::select! {
                            () = revoked.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                },
            }
        };
        let (commands_tx, commands_rx) = mpsc::channel(self.shared.settings.queue_capacity);
        let served = commands_tx.clone();
        self.writers.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(partition, commands_tx);
        let claim = if announce && !revoked.is_cancelled() {
            match self.owners.claim(partition).await {
                Ok(claim) => Some(claim),
                Err(error) => {
                    // Forwarding to this instance waits for the next claim; its own commands are
                    // served.
                    tracing::error!(partition, error = %format!("{error:#}"), "failed to announce partition ownership");
                    None
                }
            }
        } else {
            None
        };
        writer.run(commands_rx, revoked).await;
        {
            // Revoked while it was being installed: take it out, so commands go to the owner.
            let mut writers = self.writers.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if writers.get(&partition).is_some_and(|current| current.same_channel(&served)) {
                writers.remove(&partition);
            }
        }
        drop(served);
        if let Some(claim) = claim
            && let Err(error) = self.owners.release(partition, claim).await
        {
            tracing::warn!(partition, error = %format!("{error:#}"), "failed to withdraw partition ownership");
        }
    }

    /// Ready once every assigned partition is loaded and served.
    fn ready(&self) -> Result<(), String> {
        let assigned = self.assigned.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(assigned) = assigned.as_ref() else { return Err("waiting for a partition assignment".into()) };
        let writers = self.writers.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let loading: Vec<String> =
            assigned.iter().filter(|partition| !writers.contains_key(partition)).map(i32::to_string).collect();
        if loading.is_empty() { Ok(()) } else { Err(format!("loading partitions {}", loading.join(", "))) }
    }
}

/// Readiness of a service's write path: its assigned partitions are loaded.
pub struct EngineCheck<M: Model>(pub Arc<Engine<M>>);

#[async_trait::async_trait]
impl<M: Model> ReadinessCheck for EngineCheck<M> {
    fn name(&self) -> &'static str {
        "partitions"
    }

    async fn check(&self) -> Result<(), String> {
        self.0.ready()
    }
}
