//! The writer of one partition: a task that owns the partition's state, decides queued commands
//! in batches, produces their commits together and answers each caller only once its commit is
//! both acknowledged by the broker and valid in the log.
//!
//! "Valid in the log" is checked, not assumed: after a batch, if the commits landed exactly at
//! the offsets that follow the writer's state, nothing else was written in between and each one
//! is valid as decided. Otherwise another writer appended to the partition (a zombie, or an
//! owner during a rebalance): the writer reads the log from its state onwards, applies every
//! record by the shared rule, and acknowledges only the commits the rule admitted. A write that
//! lost the race is answered UNAVAILABLE; the caller's retry (same command id) is decided again.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{FutureExt, future::join_all};
use keel_domain::DomainEvent;
use keel_topics::{
    CommitHeader, EventMeta, Position, Verdict,
    reader::PartitionReader,
    record::{self, Record},
};
use rdkafka::{message::Message, producer::FutureRecord};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Model, Outcome, Reply, Request, Shared, partition::PartitionState};
use crate::{Accepted, CommandError, CommandMeta};

/// How long reading a partition to its end may wait for the next record.
const READ_BACK_STALL: Duration = Duration::from_secs(10);

/// What a command comes to before anything is sent.
enum Decision<M: Model> {
    Answer(Result<Accepted, CommandError>),
    Append(CommitHeader, Vec<M::Event>),
}

/// A decided command on its way to the broker.
struct Pending<M: Model> {
    reply: Reply<M::State>,
    header: CommitHeader,
    events: Vec<M::Event>,
}

pub(super) struct PartitionWriter<M: Model> {
    model: Arc<M>,
    shared: Arc<Shared>,
    state: PartitionState<M>,
    /// Set while the state may lag the log (after an append with an unknown outcome).
    out_of_sync: bool,
    /// Records applied since the last snapshot was taken.
    since_snapshot: u64,
    /// The snapshot being written; it hands back the aggregates it failed to write.
    snapshot: Option<JoinHandle<Result<(), Vec<Uuid>>>>,
    /// A change that must reach the snapshot store soon (see [`Model::snapshot_at_once`]).
    snapshot_due: bool,
}

/// How soon an urgent snapshot is tried again while the previous one is still being written.
const URGENT_SNAPSHOT_RETRY: Duration = Duration::from_millis(100);

impl<M: Model> PartitionWriter<M> {
    /// Loads the partition: its snapshot, then the tail of the log after it.
    pub async fn load(model: Arc<M>, shared: Arc<Shared>, partition: i32) -> anyhow::Result<Self> {
        let started = Instant::now();
        let snapshot = shared.snapshots.load::<M::State>(partition).await?;
        let end = shared.high_watermark(partition).await?;
        anyhow::ensure!(
            snapshot.next_offset <= end,
            "the snapshot of {}/{partition} is at offset {}, past the end of the log ({end}): was the topic recreated? \
             Not serving the partition (delete its rows in command_snapshots and command_snapshot_aggregates to \
             rebuild it from the log)",
            shared.topic,
            snapshot.next_offset
        );
        let restored = snapshot.entries.len();
        let state = PartitionState::restore(partition, snapshot.next_offset, snapshot.entries);
        let mut writer =
            Self { model, shared, state, out_of_sync: false, since_snapshot: 0, snapshot: None, snapshot_due: false };
        let from = writer.state.next_offset();
        writer.catch_up(&mut HashMap::new()).await?;
        let replayed = writer.state.next_offset() - from;
        let elapsed = started.elapsed();
        let topic = writer.shared.topic.clone();
        metrics::histogram!("keel_command_partition_load_seconds", "topic" => topic.clone())
            .record(elapsed.as_secs_f64());
        metrics::counter!("keel_command_replayed_records_total", "topic" => topic).increment(replayed as u64);
        tracing::info!(
            partition,
            restored,
            replayed,
            aggregates = writer.state.aggregates(),
            elapsed_ms = elapsed.as_millis() as u64,
            "partition loaded"
        );
        // What the tail added is worth keeping before serving.
        if replayed >= writer.shared.settings.snapshot_every as i64 {
            writer.take_snapshot();
        }
        Ok(writer)
    }

    /// Serves `commands` until the partition is revoked (`revoked`) or every sender is gone.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Request<M>>, revoked: CancellationToken) {
        let mut deferred = VecDeque::new();
        loop {
            let mut backoff = Duration::from_millis(100);
            while self.out_of_sync {
                if revoked.is_cancelled() {
                    break;
                }
                match self.catch_up(&mut HashMap::new()).await {
                    Ok(()) => self.out_of_sync = false,
                    Err(error) => {
                        tracing::error!(partition = self.state.partition, error = %format!("{error:#}"), "failed to catch up with the log; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            if deferred.is_empty() {
                tokio::select! {
                    biased;
                    () = revoked.cancelled() => break,
                    request = commands.recv() => match request {
                        Some(request) => deferred.push_back(request),
                        None => break,
                    },
                    // An urgent snapshot that found the last one still running tries again.
                    () = tokio::time::sleep(URGENT_SNAPSHOT_RETRY), if self.snapshot_due => {
                        self.take_snapshot();
                        continue;
                    }
                }
            }
            if revoked.is_cancelled() {
                break;
            }
            while deferred.len() < self.shared.settings.max_batch {
                match commands.try_recv() {
                    Ok(request) => deferred.push_back(request),
                    Err(_) => break,
                }
            }
            let batch: Vec<_> = deferred.drain(..deferred.len().min(self.shared.settings.max_batch)).collect();
            let postponed = self.process(batch).await;
            for request in postponed.into_iter().rev() {
                deferred.push_front(request);
            }
            if self.since_snapshot >= self.shared.settings.snapshot_every || self.snapshot_due {
                self.take_snapshot();
            }
        }
        // Let go: whatever waits is answered, the caller retries on the next owner.
        commands.close();
        while let Ok(request) = commands.try_recv() {
            deferred.push_back(request);
        }
        for request in deferred {
            request.reply.fail(CommandError::Unavailable("the partition is moving to another owner; retry".into()));
        }
        if let Some(snapshot) = self.snapshot.take() {
            self.reap(snapshot.await);
        }
        if !self.out_of_sync {
            self.take_snapshot();
            if let Some(snapshot) = self.snapshot.take() {
                let _ = snapshot.await;
            }
        }
        tracing::info!(partition = self.state.partition, "partition released");
    }

    /// A finished snapshot's aggregates that were not written are changes still to write: a
    /// later snapshot must not move the position past them without them.
    fn reap(&mut self, finished: Result<Result<(), Vec<Uuid>>, tokio::task::JoinError>) {
        match finished {
            Ok(Ok(())) => {}
            Ok(Err(unwritten)) => self.state.mark_dirty(unwritten),
            Err(_) => {
                tracing::error!(
                    partition = self.state.partition,
                    "a snapshot task failed; every aggregate will be written again"
                );
                self.state.mark_all_dirty();
            }
        }
    }

    /// Writes what changed since the last snapshot, in the background; one at a time.
    fn take_snapshot(&mut self) {
        if self.snapshot.as_ref().is_some_and(|snapshot| !snapshot.is_finished()) {
            return;
        }
        if let Some(snapshot) = self.snapshot.take() {
            // Finished, but polling may still say "not yet" (the task budget): then next time.
            match snapshot.now_or_never() {
                Some(finished) => self.reap(finished),
                None => return,
            }
        }
        self.snapshot_due = false;
        if self.state.dirty_count() == 0 {
            return;
        }
        let (next_offset, entries) = self.state.take_dirty();
        self.since_snapshot = 0;
        let store = self.shared.snapshots.clone();
        let partition = self.state.partition;
        self.snapshot = Some(tokio::spawn(async move {
            let started = Instant::now();
            match store.save(partition, next_offset, &entries).await {
                Ok(()) => {
                    tracing::debug!(
                        partition,
                        next_offset,
                        aggregates = entries.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "snapshot taken"
                    );
                    Ok(())
                }
                Err(error) => {
                    tracing::error!(partition, error = %format!("{error:#}"), "failed to write a snapshot");
                    Err(entries.into_iter().map(|(id, _)| id).collect())
                }
            }
        }));
    }

    /// Applies a record to the state, noting a change that must be snapshotted soon.
    fn apply(&mut self, offset: i64, header: &CommitHeader, events: &[M::Event]) -> Option<Verdict> {
        let verdict = self.state.apply(offset, header, events);
        if verdict == Some(Verdict::Valid) && events.iter().any(M::snapshot_at_once) {
            self.snapshot_due = true;
        }
        verdict
    }

    /// Reads the partition from the state's next offset to the current end of the log, applying
    /// every record by the shared rule. `verdicts` collects the verdict of each offset it asks for.
    async fn catch_up(&mut self, verdicts: &mut HashMap<i64, Option<Verdict>>) -> anyhow::Result<()> {
        let partition = self.state.partition;
        let start = BTreeMap::from([(partition, self.state.next_offset())]);
        let mut reader = PartitionReader::assign(&self.shared.kafka, &self.shared.topic, [partition], &start)?
            .until_current_end(&start)
            .await?;
        // A read that stops short of the end it was promised (a broker gone, offsets that never
        // come) must not hold the partition forever: give up, and let the caller retry.
        while let Some(message) = tokio::time::timeout(READ_BACK_STALL, reader.next()).await.with_context(|| {
            format!("no record of partition {partition} for {READ_BACK_STALL:?} while reading to its end")
        })?? {
            let offset = message.offset();
            let verdict = match record::read(&self.shared.codec, M::TOPIC, &message).await? {
                Record::Commit { header, decoded } => match self.model.decode(&header, decoded).await {
                    Ok(events) => self.apply(offset, &header, &events),
                    // The schema registry or the key store cannot answer: nothing is known yet.
                    Err(error) if error.is_retriable() => {
                        return Err(anyhow::Error::new(error).context(format!("failed to read offset {offset}")));
                    }
                    // Readers that need only the envelope (the audit log, the rule itself) accept
                    // this commit; skipping it here would leave this writer's versions behind
                    // theirs and void every later commit it decides. A commit the rule refuses
                    // anyway changes nothing (applying it only records that); any other stops the
                    // partition until a version of Keel that reads it takes over.
                    Err(error) if self.state.check(&header) == Verdict::Valid => anyhow::bail!(
                        "the valid commit at {}/{partition}/{offset} has events this version cannot read ({error}); \
                         not serving the partition",
                        self.shared.topic
                    ),
                    Err(_) => self.state.apply(offset, &header, &[]),
                },
                Record::Unreadable { reason } => {
                    // Skipped by every reader alike; projections send it to the dead letters.
                    tracing::warn!(partition, offset, reason, "skipping unreadable record");
                    self.state.skip(offset);
                    None
                }
            };
            if verdict.is_some() {
                self.since_snapshot += 1;
            }
            if let Some(slot) = verdicts.get_mut(&offset) {
                *slot = verdict;
            }
        }
        Ok(())
    }

    /// Decides and appends one batch. A command touching what an earlier command of the batch
    /// touches (its aggregate, or a claim such as an email) is postponed to the next batch, so
    /// that the commits of a batch are independent and one failed append cannot invalidate
    /// another, acknowledged one.
    async fn process(&mut self, batch: Vec<Request<M>>) -> Vec<Request<M>> {
        metrics::histogram!("keel_command_batch_size", "topic" => self.shared.topic.clone()).record(batch.len() as f64);
        let mut claimed = HashSet::new();
        let mut postponed = Vec::new();
        let mut admitted = Vec::new();
        let now = Instant::now();
        for request in batch {
            if request.deadline <= now {
                request.reply.fail(CommandError::Unavailable(
                    "the command waited too long to be decided; retry with the same command id".into(),
                ));
                continue;
            }
            let mut keys = request.claims.iter().cloned().chain([request.aggregate_id.to_string()]);
            if keys.any(|key| claimed.contains(&key)) {
                postponed.push(request);
                continue;
            }
            claimed.extend(request.claims.iter().cloned().chain([request.aggregate_id.to_string()]));
            admitted.push(request);
        }
        let decisions = match self.decide_fresh(&admitted).await {
            Ok(decisions) => decisions,
            Err(error) => {
                tracing::error!(partition = self.state.partition, error = %format!("{error:#}"), "cannot tell whether the state is current");
                for request in admitted {
                    request.reply.fail(CommandError::Unavailable("cannot read the log; retry".into()));
                }
                return postponed;
            }
        };
        let mut decided = Vec::new();
        for (request, decision) in admitted.into_iter().zip(decisions) {
            match decision {
                Decision::Answer(outcome) => self.answer(request.reply, outcome),
                Decision::Append(header, events) => decided.push(Pending { reply: request.reply, header, events }),
            }
        }
        if decided.is_empty() {
            return postponed;
        }
        let outcomes = join_all(decided.into_iter().map(|pending| self.append(pending))).await;
        let from = self.state.next_offset();
        let mut landed: Vec<i64> = outcomes.iter().filter_map(|(_, outcome)| outcome.as_ref().ok().copied()).collect();
        landed.sort_unstable();
        let contiguous =
            landed.len() == outcomes.len() && landed.iter().zip(from..).all(|(offset, next)| *offset == next);
        if contiguous {
            let mut outcomes = outcomes;
            outcomes.sort_by_key(|(_, outcome)| outcome.as_ref().ok().copied());
            for (pending, outcome) in outcomes {
                let offset = outcome.expect("contiguous means every append landed");
                let verdict = self.apply(offset, &pending.header, &pending.events);
                self.since_snapshot += 1;
                debug_assert_eq!(verdict, Some(Verdict::Valid), "nothing else was written in between");
                self.answer_landed(pending, offset, verdict);
            }
            return postponed;
        }
        // Something else is in the log between our commits, or an append's outcome is unknown:
        // read what is there and answer by what the rule says of each commit.
        if outcomes.iter().any(|(_, outcome)| outcome.is_err()) {
            self.shared.replace_producer_if_fatal();
        }
        let mut verdicts: HashMap<i64, Option<Verdict>> = landed.iter().map(|offset| (*offset, None)).collect();
        if let Err(error) = self.catch_up(&mut verdicts).await {
            tracing::error!(partition = self.state.partition, error = %format!("{error:#}"), "failed to read back a batch");
            self.out_of_sync = true;
            for (pending, _) in outcomes {
                pending.reply.fail(unknown_outcome());
            }
            return postponed;
        }
        metrics::counter!("keel_command_batches_read_back_total", "topic" => self.shared.topic.clone()).increment(1);
        for (pending, outcome) in outcomes {
            match outcome {
                Ok(offset) => {
                    let verdict = verdicts.get(&offset).copied().flatten();
                    self.answer_landed(pending, offset, verdict);
                }
                Err(error) => {
                    tracing::warn!(error = %error, command_id = %pending.header.command_id, "append failed; outcome unknown");
                    pending.reply.fail(error);
                }
            }
        }
        postponed
    }

    /// Answers a command whose commit the broker acknowledged at `offset`, by the rule's verdict.
    fn answer_landed(&self, pending: Pending<M>, offset: i64, verdict: Option<Verdict>) {
        let aggregate_id = pending.header.aggregate_id;
        let outcome = match verdict {
            Some(Verdict::Valid) => Ok(Accepted {
                aggregate_id,
                version: pending.header.version_after(),
                position: Some(self.position(offset)),
                replayed: false,
            }),
            // The same command was applied before ours landed (a second writer had it too): its
            // first result stands.
            Some(Verdict::DuplicateCommand) => match self.first_result(aggregate_id, pending.header.command_id) {
                Some(first) => Ok(first),
                None => Err(unknown_outcome()),
            },
            _ => {
                metrics::counter!("keel_command_lost_races_total", "topic" => self.shared.topic.clone()).increment(1);
                tracing::warn!(%aggregate_id, offset, ?verdict, "a concurrent writer got there first; the commit is void");
                Err(CommandError::Unavailable("a concurrent writer changed the aggregate; retry".into()))
            }
        };
        self.answer(pending.reply, outcome);
    }

    /// Hands a command its outcome, with its aggregate's state as the writer has it now.
    fn answer(&self, reply: Reply<M::State>, outcome: Result<Accepted, CommandError>) {
        let outcome = outcome.map(|accepted| {
            let state = self.state.entry(accepted.aggregate_id).map(|entry| entry.state.clone()).unwrap_or_default();
            Outcome { accepted, state }
        });
        reply.send(outcome);
    }

    fn position(&self, offset: i64) -> Position {
        Position { topic: self.shared.topic.clone(), partition: self.state.partition, offset }
    }

    fn first_result(&self, aggregate_id: Uuid, command_id: Uuid) -> Option<Accepted> {
        let result = self.state.entry(aggregate_id)?.result_of(command_id)?;
        Some(Accepted {
            aggregate_id,
            version: result.version,
            position: Some(self.position(result.offset)),
            replayed: true,
        })
    }

    /// Decides the commands of a batch. Appends are checked against the log after the fact; an
    /// answer without an append (a refusal, a no-op) is only as good as the state it was
    /// decided on, so when a batch holds one, the state must be as current as the log: else it
    /// catches up and decides again. (A replayed first result needs no such check: a valid
    /// commit stays valid.)
    async fn decide_fresh(&mut self, batch: &[Request<M>]) -> anyhow::Result<Vec<Decision<M>>> {
        loop {
            let decisions: Vec<Decision<M>> = batch.iter().map(|request| self.decide(request)).collect();
            let unverified = decisions
                .iter()
                .any(|decision| matches!(decision, Decision::Answer(outcome) if !outcome.as_ref().is_ok_and(|ok| ok.replayed)));
            if !unverified || self.shared.high_watermark(self.state.partition).await? <= self.state.next_offset() {
                return Ok(decisions);
            }
            metrics::counter!("keel_command_stale_decisions_total", "topic" => self.shared.topic.clone()).increment(1);
            self.catch_up(&mut HashMap::new()).await?;
        }
    }

    /// Decides one command against the state.
    fn decide(&self, request: &Request<M>) -> Decision<M> {
        let aggregate_id = request.aggregate_id;
        let entry = self.state.entry(aggregate_id);
        let current = entry.map_or(0, |entry| entry.version());
        if let Some(first) = self.first_result(aggregate_id, request.meta.command_id) {
            return Decision::Answer(Ok(first));
        }
        if request.expected_version.is_some_and(|expected| expected != current) {
            return Decision::Answer(Err(CommandError::VersionConflict { current }));
        }
        let default = M::State::default();
        let state = entry.map_or(&default, |entry| &entry.state);
        match (request.decide)(state, self.state.index()) {
            Err(error) => Decision::Answer(Err(error)),
            Ok(events) if events.is_empty() => {
                Decision::Answer(Ok(Accepted { aggregate_id, version: current, position: None, replayed: false }))
            }
            Ok(events) => Decision::Append(commit_header(aggregate_id, &request.meta, current, &events), events),
        }
    }

    /// Produces one commit to this partition; its offset, or why its outcome is unknown.
    async fn append(&self, pending: Pending<M>) -> (Pending<M>, Result<i64, CommandError>) {
        let (value, sealed) = match self.model.encode(pending.header.aggregate_id, &pending.events).await {
            Ok(encoded) => encoded,
            Err(error) => {
                tracing::error!(error = %error, "failed to encode a commit");
                return (pending, Err(CommandError::Unavailable("cannot encode the commit now; retry".into())));
            }
        };
        let mut pending = pending;
        pending.header.sealed = sealed;
        let payload = match self.shared.codec.encode(M::TOPIC, value).await {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(error = %error, "failed to encode a commit");
                return (pending, Err(CommandError::Unavailable("the schema registry is unavailable".into())));
            }
        };
        let key = pending.header.aggregate_id.to_string();
        let record = FutureRecord::to(&self.shared.topic)
            .partition(self.state.partition)
            .key(&key)
            .payload(&payload)
            .headers(pending.header.to_headers());
        // Bind the delivery future first: the refused record (not `Send`) must not live across
        // the await.
        let producer = self.shared.producer();
        let delivery = match producer.send_result(record) {
            Ok(delivery) => delivery,
            Err((error, _)) => {
                let refused = CommandError::Unavailable(format!("the producer refused the record: {error}"));
                return (pending, Err(refused));
            }
        };
        let outcome = match delivery.await {
            Ok(Ok(delivery)) => Ok(delivery.offset),
            Ok(Err((error, _))) => Err(CommandError::Unavailable(format!("the broker did not acknowledge: {error}"))),
            Err(_) => Err(CommandError::Unavailable("the producer shut down".into())),
        };
        (pending, outcome)
    }
}

fn unknown_outcome() -> CommandError {
    CommandError::Unavailable("the outcome is unknown; retry with the same command id".into())
}

fn commit_header<E: DomainEvent>(
    aggregate_id: Uuid,
    meta: &CommandMeta,
    expected_version: u64,
    events: &[E],
) -> CommitHeader {
    CommitHeader {
        command_id: meta.command_id,
        aggregate_id,
        expected_version,
        occurred_at: chrono::Utc::now(),
        actor: meta.actor.clone(),
        correlation_id: meta.correlation_id,
        causation_id: None,
        traceparent: meta.traceparent.clone(),
        sealed: false,
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
