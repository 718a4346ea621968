//! The single writer of the users topic: a task that owns the state, decides queued commands in
//! batches, produces their commits together and answers each caller once the broker acknowledged.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use chrono::Utc;
use futures::future::join_all;
use keel_domain::{
    Aggregate, DomainEvent,
    identity::{DisplayName, Email, RegisterUser, User, UserCommand, UserError, UserEvent, UserId},
};
use keel_runtime::KafkaConfig;
use keel_topics::{
    CommitHeader, EventMeta, Position, SchemaRegistryCodec, Topic, identity as wire, kafka, reader::PartitionReader,
};
use rdkafka::{
    message::Message,
    producer::{FutureProducer, FutureRecord, Producer},
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::state::IdentityState;
use crate::{Accepted, CommandError, CommandMeta};

/// A registration waiting for the writer.
pub struct Registration {
    pub email: Email,
    pub display_name: DisplayName,
    pub meta: CommandMeta,
    pub reply: oneshot::Sender<Result<Accepted, CommandError>>,
    pub received: Instant,
}

/// Everything the writer needs; `run` consumes it.
pub struct Writer {
    pub state: IdentityState,
    pub codec: SchemaRegistryCodec,
    pub producer: FutureProducer,
    pub kafka: KafkaConfig,
    pub topic: String,
    pub partitions: i32,
    pub max_batch: usize,
    /// Cleared while the state may lag the log (after an append with an unknown outcome).
    pub in_sync: Arc<AtomicBool>,
}

/// A decided command on its way to the broker.
struct Pending {
    registration: Registration,
    header: CommitHeader,
    events: Vec<UserEvent>,
}

impl Writer {
    /// Reads the whole topic to its current end.
    pub async fn load(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        self.catch_up().await?;
        tracing::info!(
            users = self.state.user_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "identity state loaded"
        );
        Ok(())
    }

    async fn catch_up(&mut self) -> anyhow::Result<()> {
        let start = self.state.next_offsets().clone();
        let mut reader = PartitionReader::assign(&self.kafka, &self.topic, 0..self.partitions, &start)?
            .until_current_end(&start)
            .await?;
        while let Some(message) = reader.next().await? {
            let header = match message.headers() {
                Some(headers) => CommitHeader::from_headers(headers),
                None => Err(keel_topics::EnvelopeError::Missing("headers")),
            };
            let payload = message.payload().unwrap_or_default();
            let decoded = match header {
                Ok(header) => match self.codec.decode(Topic::IdentityUsers, payload).await {
                    Ok(decoded) => wire::decode(&decoded).map(|events| (header, events)).map_err(|e| e.to_string()),
                    Err(error) if error.is_retriable() => return Err(error.into()),
                    Err(error) => Err(error.to_string()),
                },
                Err(error) => Err(error.to_string()),
            };
            match decoded {
                Ok((header, events)) if header.events.len() == events.len() => {
                    self.state.apply(message.partition(), message.offset(), &header, &events);
                }
                Ok(_) | Err(_) => {
                    // Unreadable records are skipped by every reader alike; projections send them
                    // to the dead-letter topic.
                    tracing::warn!(
                        partition = message.partition(),
                        offset = message.offset(),
                        "skipping unreadable record"
                    );
                }
            }
        }
        Ok(())
    }

    /// Runs until every sender is dropped (the gRPC server stopped), answering each command.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Registration>) -> anyhow::Result<()> {
        let mut deferred = VecDeque::new();
        loop {
            // After an append with an unknown outcome nothing is decided until the state has
            // caught up with the log: retry on its own, callers are refused meanwhile.
            let mut backoff = std::time::Duration::from_millis(200);
            while !self.in_sync.load(Ordering::Acquire) {
                match self.catch_up().await {
                    Ok(()) => self.in_sync.store(true, Ordering::Release),
                    Err(error) => {
                        tracing::error!(error = %format!("{error:#}"), "failed to catch up with the log; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            }
            if deferred.is_empty() {
                match commands.recv().await {
                    Some(registration) => deferred.push_back(registration),
                    None => return Ok(()),
                }
            }
            while deferred.len() < self.max_batch {
                match commands.try_recv() {
                    Ok(registration) => deferred.push_back(registration),
                    Err(_) => break,
                }
            }
            let batch: Vec<_> = deferred.drain(..deferred.len().min(self.max_batch)).collect();
            let postponed = self.process(batch).await;
            for registration in postponed.into_iter().rev() {
                deferred.push_front(registration);
            }
        }
    }

    /// Decides and appends one batch. Commands touching an email already used by an earlier
    /// command of the batch are postponed to the next batch, so that every commit of a batch is
    /// independent of the others and a failed append cannot invalidate an acknowledged one.
    async fn process(&mut self, batch: Vec<Registration>) -> Vec<Registration> {
        metrics::histogram!("keel_command_batch_size", "service" => "identity").record(batch.len() as f64);
        let mut claimed = HashSet::new();
        let mut postponed = Vec::new();
        let mut decided = Vec::new();
        for registration in batch {
            if !claimed.insert(registration.email.clone()) {
                postponed.push(registration);
                continue;
            }
            let id = UserId::new();
            let command = UserCommand::Register(RegisterUser {
                id,
                email: registration.email.clone(),
                display_name: registration.display_name.clone(),
                email_owner: self.state.email_owner(&registration.email),
            });
            match User::default().decide(command) {
                Ok(events) => {
                    let header = commit_header(id, 0, &registration.meta, &events);
                    decided.push(Pending { registration, header, events });
                }
                Err(error @ (UserError::EmailTaken | UserError::AlreadyRegistered(_))) => {
                    answer(registration, Err(CommandError::Rejected(error.to_string())));
                }
            }
        }
        let appends = decided.into_iter().map(|pending| self.append(pending));
        let outcomes = join_all(appends).await;
        // If any append failed, its record may or may not be in the log, possibly below an
        // acknowledged one: apply nothing of this batch and re-read the log from before it.
        let any_failed = outcomes.iter().any(|(_, outcome)| outcome.is_err());
        if any_failed {
            self.replace_producer_if_fatal();
            self.in_sync.store(false, Ordering::Release);
        }
        for (pending, outcome) in outcomes {
            match outcome {
                Ok((partition, offset)) => {
                    if !any_failed {
                        self.state.apply(partition, offset, &pending.header, &pending.events);
                    }
                    let accepted = Accepted {
                        aggregate_id: pending.header.aggregate_id,
                        version: pending.header.version_after(),
                        position: Position { topic: self.topic.clone(), partition, offset },
                    };
                    answer(pending.registration, Ok(accepted));
                }
                Err(error) => {
                    tracing::error!(error = %error, command_id = %pending.header.command_id, "append failed; outcome unknown");
                    answer(pending.registration, Err(error));
                }
            }
        }
        postponed
    }

    /// An idempotent producer that hit a fatal error (e.g. `OutOfOrderSequenceNumber`) refuses
    /// every later record: replace it. The state is re-read from the log before the next batch.
    fn replace_producer_if_fatal(&mut self) {
        let Some((code, reason)) = self.producer.client().fatal_error() else { return };
        tracing::error!(code = ?code, reason = %reason, "the producer failed fatally; replacing it");
        metrics::counter!("keel_producer_replacements_total", "service" => "identity").increment(1);
        match kafka::producer(&self.kafka) {
            Ok(producer) => self.producer = producer,
            Err(error) => tracing::error!(error = %format!("{error:#}"), "failed to create a new producer"),
        }
    }

    async fn append(&self, pending: Pending) -> (Pending, Result<(i32, i64), CommandError>) {
        let value = wire::encode(&pending.events);
        let payload = match self.codec.encode(Topic::IdentityUsers, value).await {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(error = %error, "failed to encode a commit");
                return (pending, Err(CommandError::Unavailable("the schema registry is unavailable".into())));
            }
        };
        let key = pending.header.aggregate_id.to_string();
        let record = FutureRecord::to(&self.topic).key(&key).payload(&payload).headers(pending.header.to_headers());
        // Bind the delivery future first: the refused record (not `Send`) must not live across
        // the await.
        let delivery = match self.producer.send_result(record) {
            Ok(delivery) => delivery,
            Err((error, _)) => {
                let refused = CommandError::Unavailable(format!("the producer refused the record: {error}"));
                return (pending, Err(refused));
            }
        };
        let outcome = match delivery.await {
            Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
            Ok(Err((error, _))) => Err(CommandError::Unavailable(format!("the broker did not acknowledge: {error}"))),
            Err(_) => Err(CommandError::Unavailable("the producer shut down".into())),
        };
        (pending, outcome)
    }
}

fn commit_header(id: UserId, expected_version: u64, meta: &CommandMeta, events: &[UserEvent]) -> CommitHeader {
    CommitHeader {
        command_id: meta.command_id,
        aggregate_id: id.as_uuid(),
        expected_version,
        occurred_at: Utc::now(),
        actor: meta.actor.clone(),
        correlation_id: meta.correlation_id,
        causation_id: None,
        traceparent: meta.traceparent.clone(),
        events: events
            .iter()
            .map(|event| EventMeta {
                event_id: Uuid::now_v7(),
                event_type: event.event_type().to_owned(),
                schema_version: event.schema_version(),
            })
            .collect(),
    }
}

fn answer(registration: Registration, outcome: Result<Accepted, CommandError>) {
    let label = match &outcome {
        Ok(_) => "accepted",
        Err(error) => error.code().slug(),
    };
    metrics::counter!("keel_commands_total", "service" => "identity", "command" => "RegisterUser", "outcome" => label)
        .increment(1);
    metrics::histogram!("keel_command_duration_seconds", "service" => "identity", "command" => "RegisterUser")
        .record(registration.received.elapsed().as_secs_f64());
    // The caller may have given up (deadline); its outcome stands in the log either way.
    let _ = registration.reply.send(outcome);
}
