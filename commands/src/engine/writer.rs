//! The writer of one partition: a task that owns the partition's state, decides queued commands
//! in batches and produces their commits without waiting for the previous batch's
//! acknowledgement. Each caller is answered only once its commit is both acknowledged by the
//! broker and known to be valid in the log.
//!
//! Decisions are speculative: a batch is decided against the state with every commit still in
//! flight already applied, on the bet that they land at the offsets that follow (one writer per
//! partition; an idempotent producer keeps their order). Never on an unconfirmed commit of the
//! same aggregate, though: a command for an aggregate with a commit in flight waits until that
//! commit is confirmed (or the writer has read the log back). The rule compares versions only, so
//! a commit decided on top of one that then lost a race could still be valid after a foreign
//! commit of the same length, on a state that never existed. Each acknowledgement checks the bet: a
//! commit that landed exactly at the offset it was decided for is valid as decided, since nothing
//! else was written before it. When the bet fails (another writer appended — a zombie, or two
//! owners during a rebalance — or an append's outcome is unknown), the writer stops deciding,
//! waits for what is in flight, takes its speculative state back to what is confirmed, reads the
//! log from there applying every record by the shared rule, and answers each caller by what the
//! rule says of its commit. A write that lost a race is answered UNAVAILABLE; the caller's retry
//! (same command id) is decided again.
//!
//! An answer that appends nothing (a refusal, a no-op, a read, or the first result of a command
//! whose commit is itself still in flight) is only as good as the state it was decided on, so it
//! waits until that state is proven to be the log's: when a commit of this writer lands at the
//! position the answer was decided at or later (nothing foreign came before it), or, when
//! nothing is in flight, when the high watermark says the log ends where the state does.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{FutureExt, StreamExt, future::join_all, stream::FuturesOrdered};
use keel_domain::DomainEvent;
use keel_topics::producer;
use keel_topics::{
    CommitHeader, EventMeta, Position, Verdict,
    reader::PartitionReader,
    record::{self, Record},
};
use rdkafka::message::Message;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    Action, Model, Outcome, Request, Shared,
    partition::{PartitionState, Undo},
};
use crate::{Accepted, CommandError, CommandMeta};

/// How long reading a partition to its end may wait for the next record.
const READ_BACK_STALL: Duration = Duration::from_secs(10);
/// Batches produced and not yet acknowledged; beyond it, deciding waits.
const MAX_IN_FLIGHT: usize = 32;
/// How long a writer that lets go of its partition waits for what it has in flight.
const RELEASE_WAIT: Duration = Duration::from_secs(5);
/// How soon an urgent snapshot is tried again while the previous one is still being written.
const URGENT_SNAPSHOT_RETRY: Duration = Duration::from_millis(100);

/// What a command comes to before anything is sent.
enum Decision<M: Model> {
    /// An answer that appends nothing, and the aggregate's state it was decided on.
    Answer(Result<Accepted, CommandError>, M::State),
    Append(CommitHeader, Vec<M::Event>),
}

/// A decided commit on its way to the broker, applied to the state at the offset it is expected
/// to land at.
struct Speculative<M: Model> {
    request: Request<M>,
    header: CommitHeader,
    events: Vec<M::Event>,
    offset: i64,
    /// The aggregate's state just after this commit.
    state: M::State,
    /// How to take it back; taken when it is.
    undo: Option<Undo<M::State>>,
    /// The commit's producer span (`publish <topic>`), ended when the commit is answered.
    span: tracing::Span,
}

/// Where a produced commit landed, as the broker said.
type Delivered = Result<i64, CommandError>;
type Deliveries = Pin<Box<dyn Future<Output = Vec<Delivered>> + Send>>;

/// A batch in flight: its commits in offset order.
struct InFlight<M: Model> {
    commits: Vec<Speculative<M>>,
}

/// A batch the broker answered while the writer was out of sync, waiting for the log's verdict.
struct Unsettled<M: Model> {
    commits: Vec<Speculative<M>>,
    delivered: Vec<Delivered>,
}

/// An answer that appends nothing, waiting for the state it was decided on to be proven.
struct Waiting<M: Model> {
    request: Request<M>,
    outcome: Result<Accepted, CommandError>,
    state: M::State,
    /// Given once every offset below this is confirmed: for a replayed first result, its own
    /// commit's; for a refusal, a no-op or a read, the offset it was decided at, where no foreign
    /// commit may be.
    needs: i64,
}

pub(super) struct PartitionWriter<M: Model> {
    model: Arc<M>,
    shared: Arc<Shared>,
    /// The state with every commit in flight applied.
    state: PartitionState<M>,
    /// Offsets below it are in the log as the state has them.
    confirmed: i64,
    /// Commands to decide, oldest first (ones to decide again go to the front).
    queue: VecDeque<Request<M>>,
    /// Commits in flight per aggregate.
    unconfirmed: HashMap<Uuid, usize>,
    /// Commands for aggregates with a commit in flight, in arrival order, waiting for it.
    parked: HashMap<Uuid, VecDeque<Request<M>>>,
    in_flight: VecDeque<InFlight<M>>,
    deliveries: FuturesOrdered<Deliveries>,
    /// Batches answered by the broker since the bet failed, oldest first.
    unsettled: Vec<Unsettled<M>>,
    waiting: Vec<Waiting<M>>,
    /// Set when a bet failed: nothing is decided until the state is the log's again.
    out_of_sync: bool,
    /// Records applied since the last snapshot was taken.
    since_snapshot: u64,
    /// A snapshot taken at a position not yet confirmed; written once it is.
    pending_snapshot: Option<(i64, super::partition::Entries<M::State>)>,
    /// The snapshot being written; it hands back the aggregates it failed to write.
    snapshot: Option<JoinHandle<Result<(), Vec<Uuid>>>>,
    /// A change that must reach the snapshot store soon (see [`Model::snapshot_at_once`]).
    snapshot_due: bool,
}

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
        let confirmed = state.next_offset();
        let mut writer = Self {
            model,
            shared,
            state,
            confirmed,
            queue: VecDeque::new(),
            unconfirmed: HashMap::new(),
            parked: HashMap::new(),
            in_flight: VecDeque::new(),
            deliveries: FuturesOrdered::new(),
            unsettled: Vec::new(),
            waiting: Vec::new(),
            out_of_sync: false,
            since_snapshot: 0,
            pending_snapshot: None,
            snapshot: None,
            snapshot_due: false,
        };
        let from = writer.state.next_offset();
        writer.catch_up(&mut HashMap::new()).await?;
        writer.confirmed = writer.state.next_offset();
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
        let mut open = true;
        loop {
            if revoked.is_cancelled() || (!open && self.queue.is_empty() && self.in_flight.is_empty()) {
                break;
            }
            if self.in_flight.is_empty() {
                if self.out_of_sync {
                    self.resync(&revoked).await;
                    continue;
                }
                if self.waiting.iter().any(|waiting| waiting.needs > self.confirmed) {
                    self.verify_at_rest().await;
                    continue;
                }
            }
            let room = !self.out_of_sync && self.in_flight.len() < MAX_IN_FLIGHT;
            if room && !self.queue.is_empty() {
                while self.queue.len() < self.shared.settings.max_batch {
                    match commands.try_recv() {
                        Ok(request) => self.queue.push_back(request),
                        Err(_) => break,
                    }
                }
                let batch: Vec<_> = self.queue.drain(..self.queue.len().min(self.shared.settings.max_batch)).collect();
                self.decide_and_send(batch).await;
                continue;
            }
            tokio::select! {
                biased;
                () = revoked.cancelled() => break,
                Some(delivered) = self.deliveries.next(), if !self.deliveries.is_empty() => self.settle(delivered),
                request = commands.recv(), if room && open => match request {
                    Some(request) => self.queue.push_back(request),
                    None => open = false,
                },
                // An urgent snapshot that found the last one still running tries again.
                () = tokio::time::sleep(URGENT_SNAPSHOT_RETRY), if self.snapshot_due => self.take_snapshot(),
            }
            if self.since_snapshot >= self.shared.settings.snapshot_every || self.snapshot_due {
                self.take_snapshot();
            }
        }
        self.release(commands).await;
    }

    /// Lets go of the partition: what is in flight gets its answer if the broker gives it in
    /// time, the rest is told to retry (on the next owner).
    async fn release(mut self, mut commands: mpsc::Receiver<Request<M>>) {
        commands.close();
        while let Ok(request) = commands.try_recv() {
            self.queue.push_back(request);
        }
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        while !self.deliveries.is_empty() && !self.out_of_sync {
            match tokio::time::timeout_at(deadline, self.deliveries.next()).await {
                Ok(Some(delivered)) => self.settle(delivered),
                _ => break,
            }
        }
        let moving = || CommandError::Unavailable("the partition is moving to another owner; retry".into());
        let unanswered = std::mem::take(&mut self.in_flight).into_iter().map(|batch| batch.commits);
        let unsettled = std::mem::take(&mut self.unsettled).into_iter().map(|batch| batch.commits);
        for commit in unanswered.chain(unsettled).flatten() {
            commit.request.reply.fail(unknown_outcome());
        }
        for waiting in std::mem::take(&mut self.waiting) {
            if waiting.needs <= self.confirmed {
                waiting.request.reply.send(waiting.outcome.map(|accepted| Outcome { accepted, state: waiting.state }));
            } else {
                waiting.request.reply.fail(moving());
            }
        }
        let parked = std::mem::take(&mut self.parked).into_values().flatten();
        for request in std::mem::take(&mut self.queue).into_iter().chain(parked) {
            request.reply.fail(moving());
        }
        if let Some(snapshot) = self.snapshot.take() {
            self.reap(snapshot.await);
        }
        if !self.out_of_sync && self.state.next_offset() == self.confirmed {
            self.take_snapshot();
            self.write_pending_snapshot();
            if let Some(snapshot) = self.snapshot.take() {
                let _ = snapshot.await;
            }
        }
        tracing::info!(partition = self.state.partition, "partition released");
    }

    /// Decides a batch against the speculative state and produces its commits.
    async fn decide_and_send(&mut self, batch: Vec<Request<M>>) {
        metrics::histogram!("keel_command_batch_size", "topic" => self.shared.topic.clone()).record(batch.len() as f64);
        let now = Instant::now();
        let mut commits: Vec<Speculative<M>> = Vec::new();
        for request in batch {
            if request.deadline <= now {
                request.reply.fail(CommandError::Unavailable(
                    "the command waited too long to be decided; retry with the same command id".into(),
                ));
                continue;
            }
            let aggregate = request.aggregate_id;
            if self.unconfirmed.contains_key(&aggregate) || self.parked.contains_key(&aggregate) {
                self.parked.entry(aggregate).or_default().push_back(request);
                continue;
            }
            match self.decide(&request) {
                Decision::Answer(outcome, state) => self.answer_when_proven(request, outcome, state),
                Decision::Append(mut header, events) => {
                    // The record carries the producer span's context, for its consumers to link to.
                    let span = publish_span(&self.shared.topic, self.state.partition, &header);
                    if let Some(traceparent) = keel_runtime::telemetry::traceparent_of(&span) {
                        header.traceparent = Some(traceparent);
                    }
                    let offset = self.state.next_offset();
                    let (verdict, undo) = self.state.apply_tracked(offset, &header, &events);
                    debug_assert_eq!(verdict, Some(Verdict::Valid), "decided on this very state");
                    if events.iter().any(M::snapshot_at_once) {
                        self.snapshot_due = true;
                    }
                    let state =
                        self.state.entry(header.aggregate_id).map(|entry| entry.state.clone()).unwrap_or_default();
                    self.since_snapshot += 1;
                    commits.push(Speculative { request, header, events, offset, state, undo: Some(undo), span });
                }
            }
        }
        if commits.is_empty() {
            return;
        }
        let (model, shared) = (self.model.clone(), self.shared.clone());
        let encoded =
            join_all(commits.iter().map(|commit| encode(&*model, &shared, &commit.header, &commit.events))).await;
        let mut deliveries = Vec::with_capacity(commits.len());
        let mut failed = None;
        for (index, (commit, encoded)) in commits.iter_mut().zip(encoded).enumerate() {
            let sent = encoded.and_then(|(payload, sealed)| {
                commit.header.sealed = sealed;
                self.send(&commit.header, &payload)
            });
            match sent {
                Ok(delivery) => deliveries.push(delivery),
                Err(error) => {
                    failed = Some((index, error));
                    break;
                }
            }
        }
        if let Some((index, error)) = failed {
            // Nothing from here on was produced: take it back. The failed command is told to
            // retry; the ones after it (and answers decided on top of it) are decided again.
            let mut not_sent = commits.split_off(index);
            let from = not_sent[0].offset;
            while let Some(mut commit) = not_sent.pop() {
                if let Some(undo) = commit.undo.take() {
                    self.state.undo(undo);
                }
                self.unconfirm(commit.header.aggregate_id);
                if not_sent.is_empty() {
                    commit.request.reply.fail(error.clone());
                } else {
                    self.queue.push_front(commit.request);
                }
            }
            self.decide_again_from(from);
            tracing::warn!(partition = self.state.partition, error = %error, "failed to produce a commit");
        }
        if commits.is_empty() {
            return;
        }
        metrics::gauge!("keel_command_in_flight_batches", "topic" => self.shared.topic.clone())
            .set((self.in_flight.len() + 1) as f64);
        self.deliveries.push_back(Box::pin(join_all(deliveries)));
        self.in_flight.push_back(InFlight { commits });
    }
}

impl<M: Model> PartitionWriter<M> {
    /// Decides one command against the speculative state.
    fn decide(&self, request: &Request<M>) -> Decision<M> {
        let aggregate_id = request.aggregate_id;
        let entry = self.state.entry(aggregate_id);
        let state = || entry.map(|entry| entry.state.clone()).unwrap_or_default();
        let current = entry.map_or(0, |entry| entry.version());
        if let Some(first) = self.first_result(aggregate_id, request.meta.command_id) {
            return Decision::Answer(Ok(first), state());
        }
        if request.expected_version.is_some_and(|expected| expected != current) {
            return Decision::Answer(Err(CommandError::VersionConflict { current }), state());
        }
        let default = M::State::default();
        let decided_on = entry.map_or(&default, |entry| &entry.state);
        let decided = match &request.action {
            Action::Decide(command) => M::decide(decided_on, self.state.index(), command),
            Action::Read => Ok(Vec::new()),
        };
        match decided {
            Err(refusal) => Decision::Answer(Err(refusal.into()), state()),
            Ok(events) if events.is_empty() => Decision::Answer(
                Ok(Accepted { aggregate_id, version: current, position: None, replayed: false }),
                state(),
            ),
            Ok(events) => Decision::Append(commit_header(aggregate_id, &request.meta, current, &events), events),
        }
    }

    /// Gives an answer that appends nothing once the state it was decided on is proven: at once
    /// when it already is.
    fn answer_when_proven(&mut self, request: Request<M>, outcome: Result<Accepted, CommandError>, state: M::State) {
        let needs = match &outcome {
            // A first result stands on its own commit.
            Ok(accepted) if accepted.replayed => accepted.position.as_ref().map_or(0, |position| position.offset + 1),
            // Anything else stands on nothing foreign at the position it was decided at.
            _ => self.state.next_offset() + 1,
        };
        let waiting = Waiting { request, outcome, state, needs };
        if waiting.needs <= self.confirmed {
            Self::give(waiting);
        } else {
            self.waiting.push(waiting);
        }
    }

    fn give(waiting: Waiting<M>) {
        waiting.request.reply.send(waiting.outcome.map(|accepted| Outcome { accepted, state: waiting.state }));
    }

    /// Answers that wait and were decided on a state from `from` on, which is being taken back,
    /// go back to the queue to be decided again.
    fn decide_again_from(&mut self, from: i64) {
        let (again, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|w| w.needs > from);
        self.waiting = keep;
        for waiting in again.into_iter().rev() {
            self.queue.push_front(waiting.request);
        }
    }

    /// One commit of `aggregate` left the flight (confirmed or taken back); with none left, the
    /// commands that waited for it go to the front of the queue, in their order.
    fn unconfirm(&mut self, aggregate: Uuid) {
        let Some(count) = self.unconfirmed.get_mut(&aggregate) else { return };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.unconfirmed.remove(&aggregate);
        if let Some(parked) = self.parked.remove(&aggregate) {
            for request in parked.into_iter().rev() {
                self.queue.push_front(request);
            }
        }
    }

    /// Takes the broker's answers for the oldest batch in flight.
    fn settle(&mut self, delivered: Vec<Delivered>) {
        let Some(batch) = self.in_flight.pop_front() else { return };
        let landed_as_bet = !self.out_of_sync
            && delivered.len() == batch.commits.len()
            && batch
                .commits
                .iter()
                .zip(&delivered)
                .all(|(commit, outcome)| outcome.as_ref().is_ok_and(|offset| *offset == commit.offset));
        if !landed_as_bet {
            if !self.out_of_sync {
                self.out_of_sync = true;
                metrics::counter!("keel_command_batches_read_back_total", "topic" => self.shared.topic.clone())
                    .increment(1);
            }
            // Answered once the log is read back (see `resync`).
            self.unsettled.push(Unsettled { commits: batch.commits, delivered });
            return;
        }
        for commit in batch.commits {
            commit.span.record("messaging.kafka.offset", commit.offset);
            self.confirmed = commit.offset + 1;
            self.unconfirm(commit.header.aggregate_id);
            let accepted = Accepted {
                aggregate_id: commit.header.aggregate_id,
                version: commit.header.version_after(),
                position: Some(self.position(commit.offset)),
                replayed: false,
            };
            commit.request.reply.send(Ok(Outcome { accepted, state: commit.state }));
        }
        self.shared.announcer.appended(&self.shared.topic, self.state.partition, self.confirmed);
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|waiting| waiting.needs <= self.confirmed);
        self.waiting = waiting;
        ready.into_iter().for_each(Self::give);
        self.write_pending_snapshot();
        metrics::gauge!("keel_command_in_flight_batches", "topic" => self.shared.topic.clone())
            .set(self.in_flight.len() as f64);
    }

    /// Nothing is in flight: proves the state of the answers still waiting (refusals decided at
    /// the end of the state) with the high watermark, or reads the log and decides them again.
    async fn verify_at_rest(&mut self) {
        match self.shared.high_watermark(self.state.partition).await {
            Ok(high) if high <= self.state.next_offset() => {
                // Nothing foreign after the state: the whole state is the log's, and every
                // waiting answer holds.
                self.confirmed = self.state.next_offset();
                for waiting in std::mem::take(&mut self.waiting) {
                    Self::give(waiting);
                }
                self.write_pending_snapshot();
            }
            Ok(_) => {
                metrics::counter!("keel_command_stale_decisions_total", "topic" => self.shared.topic.clone())
                    .increment(1);
                self.decide_again_from(i64::MIN);
                self.out_of_sync = true;
            }
            Err(error) => {
                tracing::error!(partition = self.state.partition, error = %format!("{error:#}"), "cannot tell whether the state is current");
                for waiting in std::mem::take(&mut self.waiting) {
                    waiting.request.reply.fail(CommandError::Unavailable("cannot read the log; retry".into()));
                }
            }
        }
    }

    /// The bet failed and nothing is in flight any more: takes the speculative state back to
    /// what is confirmed, reads the log from there by the shared rule, and answers every commit
    /// that was in flight by the rule's verdict on it. Retries (with backoff) until it succeeds or
    /// the partition is revoked.
    async fn resync(&mut self, revoked: &CancellationToken) {
        self.shared.replace_producer_if_fatal(self.state.partition);
        let mut landed: Vec<(Speculative<M>, Delivered)> = Vec::new();
        for batch in std::mem::take(&mut self.unsettled) {
            let mut outcomes = batch.delivered.into_iter();
            for commit in batch.commits {
                let outcome = outcomes.next().unwrap_or_else(|| Err(unknown_outcome()));
                landed.push((commit, outcome));
            }
        }
        // Back to what is confirmed, newest first.
        for (commit, _) in landed.iter_mut().rev() {
            if let Some(undo) = commit.undo.take() {
                self.state.undo(undo);
            }
        }
        if let Some((_, entries)) = self.pending_snapshot.take() {
            self.state.mark_dirty(entries.into_iter().map(|(id, _)| id));
        }
        self.decide_again_from(i64::MIN);
        // Nothing is in flight any more: what waited for a commit waits no more.
        self.unconfirmed.clear();
        let parked: Vec<Request<M>> = std::mem::take(&mut self.parked).into_values().flatten().collect();
        for request in parked.into_iter().rev() {
            self.queue.push_front(request);
        }
        let mut verdicts: HashMap<i64, Option<Verdict>> = landed
            .iter()
            .filter_map(|(_, outcome)| {
                outcome.as_ref().ok().filter(|offset| **offset >= 0).map(|offset| (*offset, None))
            })
            .collect();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.catch_up(&mut verdicts).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::error!(partition = self.state.partition, error = %format!("{error:#}"), "failed to read the log back; retrying");
                    // Callers stop waiting after their deadline; tell them now rather than then.
                    for (commit, _) in landed.drain(..) {
                        commit.request.reply.fail(unknown_outcome());
                    }
                    tokio::select! {
                        () = revoked.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.confirmed = self.state.next_offset();
        self.out_of_sync = false;
        for (commit, outcome) in landed {
            match outcome {
                Ok(offset) if offset >= 0 => {
                    let verdict = verdicts.get(&offset).copied().flatten();
                    self.answer_landed(commit, offset, verdict);
                }
                // Landed, at an offset the broker did not say (a retried duplicate): the retry
                // finds its first result.
                Ok(_) => commit.request.reply.fail(unknown_outcome()),
                Err(error) => {
                    tracing::warn!(error = %error, command_id = %commit.header.command_id, "append failed; outcome unknown");
                    commit.request.reply.fail(error);
                }
            }
        }
        self.shared.announcer.appended(&self.shared.topic, self.state.partition, self.confirmed);
    }

    /// Answers a command whose commit the broker acknowledged at `offset`, by the rule's verdict.
    fn answer_landed(&self, commit: Speculative<M>, offset: i64, verdict: Option<Verdict>) {
        commit.span.record("messaging.kafka.offset", offset);
        let aggregate_id = commit.header.aggregate_id;
        let state = || self.state.entry(aggregate_id).map(|entry| entry.state.clone()).unwrap_or_default();
        let outcome = match verdict {
            Some(Verdict::Valid) => Ok(Accepted {
                aggregate_id,
                version: commit.header.version_after(),
                position: Some(self.position(offset)),
                replayed: false,
            }),
            // The same command was applied before ours landed (a second writer had it too): its
            // first result stands.
            Some(Verdict::DuplicateCommand) => match self.first_result(aggregate_id, commit.header.command_id) {
                Some(first) => Ok(first),
                None => Err(unknown_outcome()),
            },
            _ => {
                metrics::counter!("keel_command_lost_races_total", "topic" => self.shared.topic.clone()).increment(1);
                tracing::warn!(%aggregate_id, offset, ?verdict, "a concurrent writer got there first; the commit is void");
                Err(CommandError::Unavailable("a concurrent writer changed the aggregate; retry".into()))
            }
        };
        commit.request.reply.send(outcome.map(|accepted| Outcome { accepted, state: state() }));
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

    /// Hands one commit to the producer; its delivery resolves to the offset it landed at.
    fn send(
        &self,
        header: &CommitHeader,
        payload: &[u8],
    ) -> Result<Pin<Box<dyn Future<Output = Delivered> + Send>>, CommandError> {
        let key = header.aggregate_id.to_string();
        let record = producer::Record {
            topic: &self.shared.topic,
            partition: Some(self.state.partition),
            key: key.as_bytes(),
            payload,
            headers: header.to_headers(),
        };
        let delivery = self
            .shared
            .producer(self.state.partition)
            .send(record)
            .map_err(|error| CommandError::Unavailable(format!("the producer refused the record: {error}")))?;
        Ok(Box::pin(delivery.map(|outcome| {
            outcome.map_err(|error| CommandError::Unavailable(format!("the broker did not acknowledge: {error}")))
        })))
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

    /// Applies a record read from the log to the state, noting a change that must be
    /// snapshotted soon.
    fn apply(&mut self, offset: i64, header: &CommitHeader, events: &[M::Event]) -> Option<Verdict> {
        let verdict = self.state.apply(offset, header, events);
        if verdict == Some(Verdict::Valid) && events.iter().any(M::snapshot_at_once) {
            self.snapshot_due = true;
        }
        verdict
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

    /// Takes what changed since the last snapshot; it is written once its position is confirmed
    /// (in the background, one snapshot at a time).
    fn take_snapshot(&mut self) {
        if self.pending_snapshot.is_some() || self.snapshot.as_ref().is_some_and(|snapshot| !snapshot.is_finished()) {
            return;
        }
        if let Some(snapshot) = self.snapshot.as_mut() {
            // Finished, but polling may still say "not yet" (the task budget): then next time,
            // with the handle kept (its aggregates that were not written must not be lost).
            match snapshot.now_or_never() {
                Some(finished) => {
                    self.snapshot = None;
                    self.reap(finished);
                }
                None => return,
            }
        }
        self.snapshot_due = false;
        if self.state.dirty_count() == 0 {
            return;
        }
        self.since_snapshot = 0;
        self.pending_snapshot = Some(self.state.take_dirty());
        self.write_pending_snapshot();
    }

    /// Writes the pending snapshot if its position is confirmed.
    fn write_pending_snapshot(&mut self) {
        if self.pending_snapshot.as_ref().is_none_or(|(next_offset, _)| *next_offset > self.confirmed) {
            return;
        }
        let Some((next_offset, entries)) = self.pending_snapshot.take() else { return };
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
}

/// The commit value of one command, sealed where the topic seals personal data, in the Confluent
/// wire format; and whether it was sealed.
async fn encode<M: Model>(
    model: &M,
    shared: &Shared,
    header: &CommitHeader,
    events: &[M::Event],
) -> Result<(Vec<u8>, bool), CommandError> {
    let (value, sealed) = model.encode(header.aggregate_id, events).await.map_err(|error| {
        tracing::error!(error = %error, "failed to encode a commit");
        CommandError::Unavailable("cannot encode the commit now; retry".into())
    })?;
    let payload = shared.codec.encode(M::TOPIC, value).await.map_err(|error| {
        tracing::error!(error = %error, "failed to encode a commit");
        CommandError::Unavailable("the schema registry is unavailable".into())
    })?;
    Ok((payload, sealed))
}

fn unknown_outcome() -> CommandError {
    CommandError::Unavailable("the outcome is unknown; retry with the same command id".into())
}

/// The producer span of one commit, a child of the command's span (OpenTelemetry messaging
/// conventions: `publish <topic>`, kind producer); the offset is recorded once the broker says.
fn publish_span(topic: &str, partition: i32, header: &CommitHeader) -> tracing::Span {
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = topic,
        messaging.destination.partition.id = %partition,
        messaging.kafka.message.key = %header.aggregate_id,
        messaging.kafka.offset = tracing::field::Empty,
        command_id = %header.command_id,
    );
    keel_runtime::telemetry::continue_trace(&span, header.traceparent.as_deref());
    span
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
