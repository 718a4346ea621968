//! Kafka clients configured the way Keel relies on them.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, bail};
use keel_runtime::{KafkaConfig, ReadinessCheck};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    error::RDKafkaErrorCode,
};

use crate::catalogue::{DEAD_LETTERS, Topic, TopicNames};

/// Settings shared by every client: servers, security properties and credentials.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.bootstrap_servers);
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    if let Some(password) = &config.sasl_password {
        client.set("sasl.password", password.expose());
    }
    client
}

/// A consumer whose offsets Keel stores itself: no auto commit, reads from the start by default.
pub fn consumer(config: &KafkaConfig, group_id: &str) -> anyhow::Result<BaseConsumer> {
    client_config(config)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .create()
        .context("failed to create a Kafka consumer")
}

/// Per-topic configs, as the catalogue declares them.
type TopicConfigs = &'static [(&'static str, &'static str)];

/// What `create_topics` did with one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicCreation {
    Created,
    AlreadyExists,
}

/// Creates every catalogue topic that does not exist yet, and checks that existing ones have the
/// catalogue's partition count (keys hash over it; it cannot change later).
pub async fn create_topics(
    config: &KafkaConfig,
    names: &TopicNames,
    replication_factor: i32,
) -> anyhow::Result<Vec<(String, TopicCreation)>> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(config).create().context("failed to create the Kafka admin client")?;
    // Event topics, then the auxiliary ones.
    let mut wanted: Vec<(String, i32, TopicConfigs)> =
        Topic::ALL.iter().map(|topic| (names.name(*topic), topic.spec().partitions, topic.spec().configs)).collect();
    wanted.push((names.auxiliary(&DEAD_LETTERS), DEAD_LETTERS.partitions, DEAD_LETTERS.configs));
    let new_topics: Vec<NewTopic> = wanted
        .iter()
        .map(|(name, partitions, configs)| {
            configs.iter().fold(
                NewTopic::new(name, *partitions, TopicReplication::Fixed(replication_factor)),
                |new_topic, (key, value)| new_topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new_topics, &options).await.context("failed to create topics")?;
    let mut outcome = Vec::new();
    for result in results {
        match result {
            Ok(name) => outcome.push((name, TopicCreation::Created)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => outcome.push((name, TopicCreation::AlreadyExists)),
            Err((name, code)) => bail!("failed to create topic {name}: {code}"),
        }
    }
    let metadata_client: BaseConsumer = client_config(config).create()?;
    for (name, expected, _) in &wanted {
        let partitions = partition_count(&metadata_client, name, Duration::from_secs(10)).await?;
        if partitions != *expected as usize {
            bail!("topic {name} has {partitions} partitions, the catalogue says {expected}");
        }
    }
    Ok(outcome)
}

/// The number of partitions of a topic, waiting briefly for a just-created topic to appear.
pub async fn partition_count(client: &BaseConsumer, topic: &str, timeout: Duration) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let metadata = tokio::task::block_in_place(|| client.fetch_metadata(Some(topic), Duration::from_secs(5)))
            .with_context(|| format!("failed to fetch metadata of {topic}"))?;
        let count = metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len());
        if count > 0 {
            return Ok(count);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("topic {topic} does not exist; run `keel topics create`");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Readiness: the broker answers a metadata request.
pub struct BrokerCheck {
    client: Arc<BaseConsumer>,
}

impl BrokerCheck {
    pub fn new(config: &KafkaConfig) -> anyhow::Result<Self> {
        let client = client_config(config).create().context("failed to create the Kafka health client")?;
        Ok(Self { client: Arc::new(client) })
    }
}

#[async_trait::async_trait]
impl ReadinessCheck for BrokerCheck {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn check(&self) -> Result<(), String> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || client.fetch_metadata(None, Duration::from_millis(1500)))
            .await
            .map_err(|error| error.to_string())?
            .map(|_| ())
            .map_err(|error| error.to_string())
    }
}
