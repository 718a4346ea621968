//! PostgreSQL notifications, heard on one connection per process and handed to every task that
//! subscribed to their channel.
//!
//! A notification is a hint that something changed (a projection committed a batch, a writer
//! appended to the log); subscribers must stay correct without it. When the listening connection
//! is lost, notifications may have been missed meanwhile: every subscriber is told so
//! ([`Notice::Missed`]) and looks for itself.

use std::{collections::HashMap, sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// What a subscriber hears on its channel.
#[derive(Debug, Clone)]
pub enum Notice {
    Payload(Arc<str>),
    /// Notifications may have been missed: look at the source of truth.
    Missed,
}

/// The channels this process listens on, with their subscribers.
#[derive(Clone)]
pub struct Notifications {
    channels: Arc<HashMap<&'static str, broadcast::Sender<Notice>>>,
}

impl Notifications {
    /// Declares the channels; nothing is heard until [`Self::listen`] runs.
    pub fn new(channels: &[&'static str]) -> Self {
        let channels = channels.iter().map(|channel| (*channel, broadcast::channel(1024).0)).collect();
        Self { channels: Arc::new(channels) }
    }

    /// The notices of `channel`. A channel that was not declared is never heard: its receiver
    /// says so at once (closed), and the subscriber falls back on looking for itself.
    pub fn subscribe(&self, channel: &str) -> broadcast::Receiver<Notice> {
        match self.channels.get(channel) {
            Some(sender) => sender.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    fn tell_all(&self, notice: &Notice) {
        for sender in self.channels.values() {
            let _ = sender.send(notice.clone());
        }
    }

    /// Listens on one connection of `pool` until `shutdown`, reconnecting with backoff. Behind a
    /// transaction-mode pooler, `pool` must reach PostgreSQL directly (`database.listen_url`).
    pub async fn listen(self, pool: PgPool, shutdown: CancellationToken) -> anyhow::Result<()> {
        if self.channels.is_empty() {
            return Ok(());
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                outcome = self.listen_once(&pool, &mut backoff) => outcome,
            };
            self.tell_all(&Notice::Missed);
            if let Err(error) = outcome {
                tracing::warn!(%error, "lost the database notifications; reconnecting");
                metrics::counter!("keel_notifications_reconnects_total").increment(1);
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(&self, pool: &PgPool, backoff: &mut Duration) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        let channels: Vec<&str> = self.channels.keys().copied().collect();
        listener.listen_all(channels).await?;
        *backoff = Duration::from_millis(100);
        // Whatever happened before listening was not heard.
        self.tell_all(&Notice::Missed);
        loop {
            let Some(notification) = listener.try_recv().await? else {
                return Err(sqlx::Error::Protocol("the listening connection closed".into()));
            };
            if let Some(sender) = self.channels.get(notification.channel()) {
                let _ = sender.send(Notice::Payload(notification.payload().into()));
            }
        }
    }
}
