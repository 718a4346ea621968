//! The producer of commits: idempotent (no duplicates or reordering on retries within a session),
//! acknowledged by all in-sync replicas, no transactions (Keel must work without them).
//!
//! Each record's delivery report resolves its own future. Reports are served by one thread per
//! producer that sleeps in librdkafka until a report arrives; it wakes on its own only every
//! [`POLL_TIMEOUT`] to see whether the producer was dropped. (The client library's own polling
//! thread wakes ten times a second and spins through the last millisecond of each wait, about one
//! percent of a core per idle producer.)

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use futures::FutureExt;
use keel_runtime::KafkaConfig;
use rdkafka::{
    ClientConfig, ClientContext,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Message, OwnedHeaders},
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext},
};
use tokio::sync::oneshot;

use crate::kafka::client_config;

/// How long the report thread sleeps when nothing happens.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// Hands each delivery report to the future of its record.
struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<oneshot::Sender<Result<i64, KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, sender: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(message) => Ok(message.offset()),
            Err((error, _)) => Err(error.clone()),
        };
        let _ = sender.send(outcome);
    }
}

/// One record to produce.
pub struct Record<'a> {
    pub topic: &'a str,
    /// `None`: the configured partitioner picks it from the key.
    pub partition: Option<i32>,
    pub key: &'a [u8],
    pub payload: &'a [u8],
    pub headers: OwnedHeaders,
}

/// A producer whose sends resolve to the offset each record landed at.
pub struct Producer {
    client: Arc<BaseProducer<Reports>>,
    stop: Arc<AtomicBool>,
}

impl Producer {
    /// The producer of commits (see the module).
    pub fn commits(config: &KafkaConfig) -> anyhow::Result<Self> {
        let mut settings = ClientConfig::new();
        // Defaults an operator may change through `kafka.properties`:
        // the linger only gathers a burst that starts from idle (see below);
        settings.set("linger.ms", "1");
        settings.set("compression.type", "lz4");
        settings.set("message.timeout.ms", "30000");
        for (key, value) in &client_config(config).config_map() {
            settings.set(*key, *value);
        }
        // What correctness rests on, whatever `kafka.properties` says: no duplicates or
        // reordering on retries, acknowledged by all in-sync replicas, keys partitioned the way
        // Java clients do. With more than one request in flight a retried batch can race the next
        // one, and the broker answers `OutOfOrderSequenceNumber`, which is fatal to an idempotent
        // producer (seen on nisshi under load). Requests stay large anyway: writers do not wait
        // for one batch's acknowledgement before deciding the next, so what they decide while a
        // request is in flight goes out together in the next one.
        let client: BaseProducer<Reports> = settings
            .set("enable.idempotence", "true")
            .set("max.in.flight.requests.per.connection", "1")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .create_with_context(Reports)
            .context("failed to create the Kafka producer")?;
        let client = Arc::new(client);
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::Builder::new().name("keel producer".into()).spawn({
            let (client, stop) = (client.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Acquire) {
                    client.poll(POLL_TIMEOUT);
                }
            }
        })?;
        Ok(Self { client, stop })
    }

    /// Queues `record`; the future resolves once the broker acknowledged it (with its offset),
    /// or once it failed for good. `Err` when the producer refuses it at once (its queue is full,
    /// or it failed fatally).
    pub fn send(
        &self,
        record: Record<'_>,
    ) -> Result<impl Future<Output = Result<i64, KafkaError>> + Send + 'static, KafkaError> {
        let (sender, report) = oneshot::channel();
        let mut base = BaseRecord::with_opaque_to(record.topic, Box::new(sender))
            .key(record.key)
            .payload(record.payload)
            .headers(record.headers);
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        self.client.send(base).map_err(|(error, _)| error)?;
        Ok(report.map(|outcome| outcome.unwrap_or(Err(KafkaError::Canceled))))
    }

    /// The error that made an idempotent producer refuse every later record, if one did.
    pub fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.client.client().fatal_error()
    }

    /// Waits (blocking) until every queued record is delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.client.flush(timeout)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The report thread ends within `POLL_TIMEOUT`, dropping the client with it.
        self.stop.store(true, Ordering::Release);
    }
}
