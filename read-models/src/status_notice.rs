//! Telling gateways, inside a batch's transaction, which accounts' status the batch changed
//! ([`keel_topics::STATUS_CHANNEL`]): they drop exactly those from their caches, and keep what a
//! batch of other changes (renames, refreshes) leaves as it was.

use sqlx::PgConnection;
use uuid::Uuid;

/// More changes than this in one batch are announced as "all of them".
const MOST_LISTED: usize = 100;

/// What kind of account status changed.
#[derive(Debug, Clone, Copy)]
pub enum Subject {
    User,
    Session,
}

impl Subject {
    fn one(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Session => "session",
        }
    }

    fn all(self) -> &'static str {
        match self {
            Self::User => "users *",
            Self::Session => "sessions *",
        }
    }
}

/// Announces that the status of `ids` changed; delivered when the caller's transaction commits.
pub async fn announce(connection: &mut PgConnection, subject: Subject, ids: &[Uuid]) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let payload = if ids.len() > MOST_LISTED {
        subject.all().to_owned()
    } else {
        ids.iter().map(|id| format!("{} {id}", subject.one())).collect::<Vec<_>>().join(" ")
    };
    sqlx::query("SELECT pg_notify($1, $2)").bind(keel_topics::STATUS_CHANNEL).bind(payload).execute(connection).await?;
    Ok(())
}
