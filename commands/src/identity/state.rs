//! The identity service's in-memory state, rebuilt from the users topic.

use std::collections::{BTreeMap, HashMap};

use keel_domain::{
    Aggregate,
    identity::{Email, User, UserEvent, UserId},
};
use keel_topics::{CommitHeader, StreamState, Verdict};

/// Users, the email index and how far the log has been read.
#[derive(Debug, Default)]
pub struct IdentityState {
    users: HashMap<UserId, (StreamState, User)>,
    emails: HashMap<Email, UserId>,
    /// Per partition, the next offset to read.
    next_offsets: BTreeMap<i32, i64>,
}

impl IdentityState {
    pub fn email_owner(&self, email: &Email) -> Option<UserId> {
        self.emails.get(email).copied()
    }

    pub fn next_offsets(&self) -> &BTreeMap<i32, i64> {
        &self.next_offsets
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Applies one record of the log, in offset order. Records at or before what was already
    /// applied are ignored, so catching up after an uncertain append is safe. Returns the
    /// validation verdict, or `None` for a record already applied.
    pub fn apply(
        &mut self,
        partition: i32,
        offset: i64,
        header: &CommitHeader,
        events: &[UserEvent],
    ) -> Option<Verdict> {
        if self.next_offsets.get(&partition).is_some_and(|next| offset < *next) {
            return None;
        }
        self.next_offsets.insert(partition, offset + 1);
        let id = UserId::from_uuid(header.aggregate_id);
        let (stream, user) = self.users.entry(id).or_default();
        let verdict = stream.admit(header);
        if verdict == Verdict::Valid {
            let before = user.email().cloned();
            *user = events.iter().fold(std::mem::take(user), |user, event| user.evolve(event));
            if let Some(old) = before.filter(|old| Some(old) != user.email()) {
                self.emails.remove(&old);
            }
            if let Some(email) = user.email() {
                self.emails.insert(email.clone(), id);
            }
        } else if stream.version() == 0 {
            // A skipped commit must leave no trace, not even an empty entry.
            self.users.remove(&id);
        }
        Some(verdict)
    }
}
