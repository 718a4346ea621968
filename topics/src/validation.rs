//! The deterministic validation rule every reader applies to every commit.
//!
//! A commit is valid only if its expected version equals the aggregate's current version and its
//! command id is not among the aggregate's recent command ids. Command state, projections, the
//! audit log and streams all run this same function over the same log, so a zombie writer's late
//! commit is skipped by everyone alike and can never fork the state.

use std::collections::VecDeque;

use uuid::Uuid;

use crate::envelope::CommitHeader;

/// How many command ids per aggregate are remembered. Part of the rule: every reader must use the
/// same window, so it is a constant, not configuration.
pub const COMMAND_ID_WINDOW: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    /// The command id was already applied: a retry or a duplicate append.
    DuplicateCommand,
    /// Decided against another version: a stale or concurrent writer.
    VersionMismatch {
        expected: u64,
        actual: u64,
    },
    /// A commit without events is meaningless and would not advance the version.
    Empty,
}

/// What the rule needs to know about one aggregate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    version: u64,
    recent_commands: VecDeque<Uuid>,
}

impl StreamState {
    pub fn from_parts(version: u64, recent_commands: impl IntoIterator<Item = Uuid>) -> Self {
        let mut recent_commands: VecDeque<Uuid> = recent_commands.into_iter().collect();
        while recent_commands.len() > COMMAND_ID_WINDOW {
            recent_commands.pop_front();
        }
        Self { version, recent_commands }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Oldest first.
    pub fn recent_commands(&self) -> impl Iterator<Item = &Uuid> {
        self.recent_commands.iter()
    }

    pub fn has_seen(&self, command_id: Uuid) -> bool {
        self.recent_commands.contains(&command_id)
    }

    pub fn check(&self, commit: &CommitHeader) -> Verdict {
        if commit.events.is_empty() {
            Verdict::Empty
        } else if self.has_seen(commit.command_id) {
            Verdict::DuplicateCommand
        } else if commit.expected_version != self.version {
            Verdict::VersionMismatch { expected: commit.expected_version, actual: self.version }
        } else {
            Verdict::Valid
        }
    }

    /// Checks the commit and, if it is valid, records it. Returns the verdict either way.
    pub fn admit(&mut self, commit: &CommitHeader) -> Verdict {
        let verdict = self.check(commit);
        if verdict == Verdict::Valid {
            self.version = commit.version_after();
            self.recent_commands.push_back(commit.command_id);
            if self.recent_commands.len() > COMMAND_ID_WINDOW {
                self.recent_commands.pop_front();
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::envelope::EventMeta;

    fn commit(command_id: Uuid, expected_version: u64, events: usize) -> CommitHeader {
        CommitHeader {
            command_id,
            aggregate_id: Uuid::nil(),
            expected_version,
            occurred_at: Utc::now(),
            actor: "test".into(),
            correlation_id: Uuid::nil(),
            causation_id: None,
            traceparent: None,
            sealed: false,
            events: (0..events)
                .map(|_| EventMeta { event_id: Uuid::new_v4(), event_type: "E".into(), schema_version: 1 })
                .collect(),
        }
    }

    #[test]
    fn a_commit_at_the_current_version_is_valid_and_advances_by_its_event_count() {
        let mut state = StreamState::default();
        assert_eq!(state.admit(&commit(Uuid::new_v4(), 0, 2)), Verdict::Valid);
        assert_eq!(state.version(), 2);
    }

    #[test]
    fn a_stale_commit_is_skipped_and_changes_nothing() {
        let mut state = StreamState::default();
        state.admit(&commit(Uuid::new_v4(), 0, 1));
        let before = state.clone();
        assert_eq!(state.admit(&commit(Uuid::new_v4(), 0, 1)), Verdict::VersionMismatch { expected: 0, actual: 1 });
        assert_eq!(state, before);
    }

    #[test]
    fn a_repeated_command_id_is_skipped_even_at_the_right_version() {
        let mut state = StreamState::default();
        let command = Uuid::new_v4();
        state.admit(&commit(command, 0, 1));
        assert_eq!(state.admit(&commit(command, 1, 1)), Verdict::DuplicateCommand);
        assert_eq!(state.version(), 1);
    }

    #[test]
    fn empty_commits_are_invalid() {
        assert_eq!(StreamState::default().admit(&commit(Uuid::new_v4(), 0, 0)), Verdict::Empty);
    }

    #[test]
    fn the_window_is_bounded_and_identical_after_a_round_trip() {
        let mut state = StreamState::default();
        for version in 0..(COMMAND_ID_WINDOW as u64 + 10) {
            assert_eq!(state.admit(&commit(Uuid::new_v4(), version, 1)), Verdict::Valid);
        }
        assert_eq!(state.recent_commands().count(), COMMAND_ID_WINDOW);
        let restored = StreamState::from_parts(state.version(), state.recent_commands().copied());
        assert_eq!(restored, state);
    }
}
