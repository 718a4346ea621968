//! The state of one partition as its writer knows it: every aggregate of the partition, with what
//! the shared validation rule needs, the recent command results (for idempotent retries), and a
//! partition-wide index for lookups across aggregates.

use std::collections::{HashMap, HashSet, VecDeque};

use keel_domain::Aggregate;
use keel_topics::{CommitHeader, StreamState, Verdict, validation::COMMAND_ID_WINDOW};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Model;

/// What a command produced: kept for the command ids the rule remembers, so that a retry gets
/// the first result back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub command_id: Uuid,
    /// The aggregate's version after the commit.
    pub version: u64,
    pub offset: i64,
}

/// Aggregates by id, as a snapshot holds them.
pub type Entries<S> = Vec<(Uuid, Entry<S>)>;

/// One aggregate of the partition.
#[derive(Debug, Clone)]
pub struct Entry<S> {
    pub stream: StreamState,
    pub state: S,
    /// Oldest first, at most [`COMMAND_ID_WINDOW`]: the results of the ids `stream` remembers.
    pub results: VecDeque<CommandResult>,
    /// The offset of the last valid commit applied; records at or before it are already in.
    pub last_offset: i64,
}

impl<S: Default> Default for Entry<S> {
    fn default() -> Self {
        Self { stream: StreamState::default(), state: S::default(), results: VecDeque::new(), last_offset: -1 }
    }
}

impl<S> Entry<S> {
    pub fn version(&self) -> u64 {
        self.stream.version()
    }

    pub fn result_of(&self, command_id: Uuid) -> Option<CommandResult> {
        self.results.iter().rev().find(|result| result.command_id == command_id).copied()
    }
}

/// How to take back one speculative commit ([`PartitionState::apply_tracked`]).
pub struct Undo<S> {
    id: Uuid,
    previous: Option<Entry<S>>,
    next_offset: i64,
}

pub struct PartitionState<M: Model> {
    pub partition: i32,
    /// The next offset to read: everything before it is applied.
    next_offset: i64,
    entries: HashMap<Uuid, Entry<M::State>>,
    index: M::Index,
    /// Aggregates changed since the last snapshot was taken.
    dirty: HashSet<Uuid>,
}

impl<M: Model> PartitionState<M> {
    #[cfg(test)]
    pub fn new(partition: i32) -> Self {
        Self::restore(partition, 0, Vec::new())
    }

    /// The state a snapshot describes: `entries` as of `next_offset` (an entry may be further).
    pub fn restore(partition: i32, next_offset: i64, entries: Entries<M::State>) -> Self {
        let mut index = M::Index::default();
        let empty = M::State::default();
        for (id, entry) in &entries {
            M::reindex(&mut index, *id, &empty, &entry.state);
        }
        Self { partition, next_offset, entries: entries.into_iter().collect(), index, dirty: HashSet::new() }
    }

    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    pub fn entry(&self, id: Uuid) -> Option<&Entry<M::State>> {
        self.entries.get(&id)
    }

    pub fn index(&self) -> &M::Index {
        &self.index
    }

    pub fn aggregates(&self) -> usize {
        self.entries.len()
    }

    /// Applies the record at `offset`, in offset order. Records already applied are ignored and
    /// give `None`; otherwise the verdict of the shared rule.
    pub fn apply(&mut self, offset: i64, header: &CommitHeader, events: &[M::Event]) -> Option<Verdict> {
        if offset < self.next_offset {
            return None;
        }
        self.next_offset = offset + 1;
        self.admit(offset, header, events)
    }

    /// Like [`Self::apply`], keeping what it takes to undo it.
    pub fn apply_tracked(
        &mut self,
        offset: i64,
        header: &CommitHeader,
        events: &[M::Event],
    ) -> (Option<Verdict>, Undo<M::State>) {
        let undo = Undo {
            id: header.aggregate_id,
            previous: self.entries.get(&header.aggregate_id).cloned(),
            next_offset: self.next_offset,
        };
        (self.apply(offset, header, events), undo)
    }

    /// Takes back a commit applied with [`Self::apply_tracked`]; undos go in reverse order.
    pub fn undo(&mut self, undo: Undo<M::State>) {
        let empty = M::State::default();
        let current = self.entries.remove(&undo.id);
        let after = current.as_ref().map_or(&empty, |entry| &entry.state);
        let before = undo.previous.as_ref().map_or(&empty, |entry| &entry.state);
        M::reindex(&mut self.index, undo.id, after, before);
        if let Some(previous) = undo.previous {
            self.entries.insert(undo.id, previous);
            // Whatever a snapshot took meanwhile, the row must be written as it is now.
            self.dirty.insert(undo.id);
        } else {
            self.dirty.remove(&undo.id);
        }
        self.next_offset = undo.next_offset;
    }

    /// The rule's verdict on a commit at the current state, without applying it.
    pub fn check(&self, header: &CommitHeader) -> Verdict {
        self.entries
            .get(&header.aggregate_id)
            .map_or_else(|| StreamState::default().check(header), |entry| entry.stream.check(header))
    }

    /// Skips an unreadable record: every reader skips it alike.
    pub fn skip(&mut self, offset: i64) {
        self.next_offset = self.next_offset.max(offset + 1);
    }

    fn admit(&mut self, offset: i64, header: &CommitHeader, events: &[M::Event]) -> Option<Verdict> {
        let id = header.aggregate_id;
        let known = self.entries.contains_key(&id);
        let entry = self.entries.entry(id).or_default();
        if offset <= entry.last_offset {
            // A snapshot row written further than its snapshot's position already holds it.
            return None;
        }
        let verdict = entry.stream.admit(header);
        if verdict == Verdict::Valid {
            let before = entry.state.clone();
            entry.state = events.iter().fold(std::mem::take(&mut entry.state), |state, event| state.evolve(event));
            M::reindex(&mut self.index, id, &before, &entry.state);
            entry.results.push_back(CommandResult {
                command_id: header.command_id,
                version: header.version_after(),
                offset,
            });
            if entry.results.len() > COMMAND_ID_WINDOW {
                entry.results.pop_front();
            }
            entry.last_offset = offset;
            self.dirty.insert(id);
        } else if !known {
            // A skipped commit leaves no trace, not even an empty entry.
            self.entries.remove(&id);
        }
        Some(verdict)
    }

    /// Marks aggregates as changed again (their snapshot rows could not be written).
    pub fn mark_dirty(&mut self, ids: impl IntoIterator<Item = Uuid>) {
        self.dirty.extend(ids.into_iter().filter(|id| self.entries.contains_key(id)));
    }

    pub fn mark_all_dirty(&mut self) {
        self.dirty.extend(self.entries.keys().copied());
    }

    /// How many aggregates changed since the last [`Self::take_dirty`].
    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// The aggregates changed since the last call, as they are now, and the offset they are at.
    pub fn take_dirty(&mut self) -> (i64, Entries<M::State>) {
        let dirty = std::mem::take(&mut self.dirty);
        let entries = dirty.into_iter().filter_map(|id| Some((id, self.entries.get(&id)?.clone()))).collect();
        (self.next_offset, entries)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use keel_domain::identity::{DisplayName, DisplayNameChanged, Email, User, UserEvent, UserId, UserRegistered};
    use keel_topics::EventMeta;

    use super::*;
    use crate::identity::Users;

    fn commit(aggregate_id: Uuid, command_id: Uuid, expected_version: u64) -> CommitHeader {
        CommitHeader {
            command_id,
            aggregate_id,
            expected_version,
            occurred_at: Utc::now(),
            actor: "test".into(),
            correlation_id: command_id,
            causation_id: None,
            traceparent: None,
            sealed: false,
            events: vec![EventMeta { event_id: Uuid::now_v7(), event_type: "E".into(), schema_version: 1 }],
        }
    }

    fn registered(id: Uuid, email: &str) -> UserEvent {
        UserEvent::Registered(UserRegistered {
            id: UserId::from_uuid(id),
            email: Email::parse(email).unwrap(),
            display_name: DisplayName::parse("Ada").unwrap(),
        })
    }

    fn renamed(id: Uuid, name: &str) -> UserEvent {
        UserEvent::DisplayNameChanged(DisplayNameChanged {
            id: UserId::from_uuid(id),
            display_name: DisplayName::parse(name).unwrap(),
        })
    }

    #[test]
    fn valid_commits_advance_the_state_the_index_and_the_results() {
        let mut state = PartitionState::<Users>::new(0);
        let (id, command) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(state.apply(0, &commit(id, command, 0), &[registered(id, "ada@example.com")]), Some(Verdict::Valid));
        let entry = state.entry(id).unwrap();
        assert_eq!((entry.version(), entry.last_offset), (1, 0));
        assert_eq!(entry.result_of(command), Some(CommandResult { command_id: command, version: 1, offset: 0 }));
        // Already applied: ignored. A stale commit: skipped, no trace.
        assert_eq!(state.apply(0, &commit(id, command, 0), &[registered(id, "ada@example.com")]), None);
        let other = Uuid::now_v7();
        assert_eq!(
            state.apply(1, &commit(other, Uuid::now_v7(), 3), &[registered(other, "bo@example.com")]),
            Some(Verdict::VersionMismatch { expected: 3, actual: 0 })
        );
        assert!(state.entry(other).is_none());
        assert_eq!(state.next_offset(), 2);
    }

    #[test]
    fn a_restored_row_ahead_of_its_snapshot_position_is_not_applied_twice() {
        let id = Uuid::now_v7();
        let mut tail = PartitionState::<Users>::new(0);
        let first = commit(id, Uuid::now_v7(), 0);
        let second = commit(id, Uuid::now_v7(), 1);
        tail.apply(10, &first, &[registered(id, "ada@example.com")]);
        tail.apply(11, &second, &[renamed(id, "Ada L.")]);
        let (_, rows) = tail.take_dirty();
        // The rows are at offset 11, the position says 10: the replay from 10 must skip 10 and 11.
        let mut restored = PartitionState::<Users>::restore(0, 10, rows);
        assert_eq!(restored.apply(10, &first, &[registered(id, "ada@example.com")]), None);
        assert_eq!(restored.apply(11, &second, &[renamed(id, "Ada L.")]), None);
        let entry = restored.entry(id).unwrap();
        assert_eq!(entry.version(), 2);
        assert_eq!(entry.state.display_name().unwrap().as_str(), "Ada L.");
        assert_eq!(restored.dirty_count(), 0);
        let third = commit(id, Uuid::now_v7(), 2);
        assert_eq!(restored.apply(12, &third, &[renamed(id, "Ada")]), Some(Verdict::Valid));
        assert!(matches!(&restored.entry(id).unwrap().state, User::Registered { .. }));
    }
}
