//! The values a job is made of.

use std::fmt;

use uuid::Uuid;

use crate::InvalidValue;

/// A job's id. Derived, so that whoever schedules the same thing twice schedules one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

const SCHEDULE_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d6a_6f62_732d_7363_6865_6401);
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d6a_6f62_732d_6b65_7973_0001);
const TICK_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d6a_6f62_732d_7469_636b_0001);

impl JobId {
    /// The job a schedule command makes: a retried command is the same job.
    pub fn for_schedule(command_id: Uuid) -> Self {
        Self(Uuid::new_v5(&SCHEDULE_NAMESPACE, command_id.as_bytes()))
    }

    /// The one job of a type under a unique key, whoever schedules it and however often.
    pub fn for_key(job_type: &JobType, key: &str) -> Self {
        let name = format!("{}\u{0}{key}", job_type.as_str());
        Self(Uuid::new_v5(&KEY_NAMESPACE, name.as_bytes()))
    }

    /// The job of one tick of a cron schedule: every scheduler, before or after any restart,
    /// derives the same id for it.
    pub fn for_tick(schedule: &str, tick: Timestamp) -> Self {
        let name = format!("{schedule}\u{0}{}", tick.as_millis());
        Self(Uuid::new_v5(&TICK_NAMESPACE, name.as_bytes()))
    }

    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a job does, naming its handler: `blog.publish_post`, `auth.expire_sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct JobType(String);

impl JobType {
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        let valid = (1..=64).contains(&text.len())
            && text.starts_with(|c: char| c.is_ascii_lowercase())
            && text.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(InvalidValue::new("type", "must be 1 to 64 of a-z, 0-9, '_', '.', '-', starting with a letter"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a job's handler is given: JSON text, at most [`Payload::MAX_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Payload(String);

impl Payload {
    pub const MAX_BYTES: usize = 64 * 1024;

    pub fn parse(text: String) -> Result<Self, InvalidValue> {
        if text.len() > Self::MAX_BYTES {
            return Err(InvalidValue::new("payload", "must be at most 64 KiB"));
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A point in time: milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(millis: i64) -> Self {
        Self(millis)
    }

    pub const fn as_millis(&self) -> i64 {
        self.0
    }

    /// `millis` later (saturating).
    pub const fn plus_millis(&self, millis: u64) -> Self {
        let millis = if millis > i64::MAX as u64 { i64::MAX } else { millis as i64 };
        Self(self.0.saturating_add(millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_from_what_was_scheduled() {
        let command = Uuid::now_v7();
        assert_eq!(JobId::for_schedule(command), JobId::for_schedule(command));
        let publish = JobType::parse("blog.publish_post").unwrap();
        assert_eq!(JobId::for_key(&publish, "post-1"), JobId::for_key(&publish, "post-1"));
        assert_ne!(JobId::for_key(&publish, "post-1"), JobId::for_key(&publish, "post-2"));
        let other = JobType::parse("blog.other").unwrap();
        assert_ne!(JobId::for_key(&publish, "k"), JobId::for_key(&other, "k"), "a key is per type");
        let tick = Timestamp::from_millis(1_000);
        assert_eq!(JobId::for_tick("expire-sessions", tick), JobId::for_tick("expire-sessions", tick));
        assert_ne!(
            JobId::for_tick("expire-sessions", tick),
            JobId::for_tick("expire-sessions", tick.plus_millis(1000))
        );
    }

    #[test]
    fn types_and_payloads_are_checked() {
        for good in ["a", "blog.publish_post", "auth.expire-sessions2"] {
            assert!(JobType::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "Blog", "1job", "a b", "a/b", &"a".repeat(65)] {
            assert!(JobType::parse(bad).is_err(), "{bad}");
        }
        assert!(Payload::parse("x".repeat(Payload::MAX_BYTES)).is_ok());
        assert!(Payload::parse("x".repeat(Payload::MAX_BYTES + 1)).is_err());
        assert_eq!(Timestamp::from_millis(i64::MAX - 1).plus_millis(u64::MAX), Timestamp::from_millis(i64::MAX));
    }
}
