//! The live feed: one reader per projector instance over every partition it was assigned. Each
//! record is fetched and read once, then handed to every projection that applies it; each
//! projection (a *lane*) applies what it was handed in batches, in a task of its own, so one
//! projection's transaction overlaps with the next records' fetching and reading.
//!
//! A lane applies a record that arrives after a quiet spell at once; under a steady stream it
//! starts a batch at most every `batch_interval`, with whatever arrived meanwhile (up to
//! `batch_size`), since each batch is a transaction with a fixed cost. A lane that is slower than
//! the others holds the feed back (its channel is bounded), never the other way round.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_topics::{Topic, reader::PartitionKey, reader::PartitionReader};
use rdkafka::message::Message;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    Projector,
    runner::{Batch, Exit, Guard, Item, Lane, Runner, read},
};

/// High watermarks as the feed's reader knows them, for the lanes' lag.
#[derive(Clone, Default)]
struct Ends(Arc<Mutex<BTreeMap<PartitionKey, i64>>>);

impl Ends {
    fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&(topic.to_owned(), partition)).copied()
    }

    fn learn(&self, reader: &PartitionReader, key: &PartitionKey) {
        if let Some(high) = reader.cached_high_watermark(&key.0, key.1) {
            self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key.clone(), high);
        }
    }
}

/// What the dispatcher knows of a lane: which records to hand it.
struct Route {
    name: &'static str,
    topics: HashSet<String>,
    /// Where the lane starts; records before it are the lane's past.
    from: BTreeMap<PartitionKey, i64>,
    sender: mpsc::Sender<Arc<Item>>,
}

impl Route {
    fn wants(&self, item: &Item) -> bool {
        let key = (item.message.topic().to_owned(), item.message.partition());
        self.topics.contains(&key.0) && self.from.get(&key).is_none_or(|from| item.message.offset() >= *from)
    }
}

/// Why the feed stopped, and which projection made it stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stop {
    pub exit: Exit,
    pub projection: Option<&'static str>,
}

/// Runs `runners` (live versions) over `partitions` until shutdown, until `restart` is
/// cancelled, or until a lane stops (another version is live, its poison policy stopped it, its
/// checkpoints moved under it). Every lane finishes or rolls back its batch before this returns.
pub(crate) async fn run(
    projector: &Projector,
    runners: Vec<Arc<Runner>>,
    partitions: Vec<PartitionKey>,
    shutdown: &CancellationToken,
    restart: &CancellationToken,
) -> anyhow::Result<Stop> {
    let mut lanes = Vec::with_capacity(runners.len());
    for runner in runners {
        let topics: HashSet<String> =
            runner.projection.topics().iter().map(|topic| projector.names.name(*topic)).collect();
        let own: Vec<PartitionKey> = partitions.iter().filter(|key| topics.contains(&key.0)).cloned().collect();
        if !own.is_empty() {
            lanes.push(runner.lane(own).await?);
        }
    }
    if lanes.is_empty() {
        // Every projection is stopped by its poison policy: wait to be restarted.
        tokio::select! {
            () = shutdown.cancelled() => return Ok(Stop { exit: Exit::Shutdown, projection: None }),
            () = restart.cancelled() => return Ok(Stop { exit: Exit::Reassigned, projection: None }),
        }
    }
    // Each partition is read from the earliest position any lane needs.
    let mut start: BTreeMap<PartitionKey, i64> = BTreeMap::new();
    for key in &partitions {
        let positions = lanes.iter().filter(|lane| lane.partitions.contains(key));
        if let Some(from) = positions.map(|lane| lane.checkpoints.get(key).copied().unwrap_or(0)).min() {
            start.insert(key.clone(), from);
        }
    }
    let read_partitions: Vec<PartitionKey> = start.keys().cloned().collect();
    tracing::info!(partitions = read_partitions.len(), lanes = lanes.len(), "projector feed starting");
    let fetch_interval = Duration::from_millis(projector.config.fetch_interval_ms);
    let mut reader =
        PartitionReader::live(&projector.kafka, read_partitions, &start, &projector.notifications, fetch_interval)?;
    let ends = Ends::default();
    let stop = shutdown.child_token();
    let mut routes = Vec::with_capacity(lanes.len());
    let mut tasks = JoinSet::new();
    for lane in lanes {
        let (sender, receiver) = mpsc::channel(lane.runner.settings.batch_size.max(1));
        let name = lane.runner.projection.name();
        routes.push(Route { name, topics: lane_topics(&lane), from: lane.checkpoints.clone(), sender });
        tasks.spawn(run_lane(lane, receiver, ends.clone(), stop.clone()));
    }
    let topics: BTreeMap<String, Topic> =
        Topic::ALL.iter().map(|topic| (projector.names.name(*topic), *topic)).collect();
    let fanout = Fanout { projector, routes: &routes, topics: &topics, ends: &ends };
    let outcome = fanout.dispatch(&mut reader, &mut tasks, shutdown, restart).await;
    // Lanes finish the batch they hold (whatever stopped the feed, an error included); records
    // still queued for them are read again next time.
    drop(routes);
    stop.cancel();
    let mut lane_stops = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        lane_stops.push(joined.map_err(|error| anyhow::anyhow!("a projection lane panicked: {error}"))?);
    }
    let mut first_stop = outcome?;
    for lane_stop in lane_stops {
        let lane_stop = lane_stop?;
        if first_stop.exit == Exit::Reassigned && lane_stop.exit != Exit::Shutdown {
            first_stop = lane_stop;
        }
    }
    Ok(first_stop)
}

fn lane_topics(lane: &Lane) -> HashSet<String> {
    lane.partitions.iter().map(|(topic, _)| topic.clone()).collect()
}

/// What the feed hands records out with.
struct Fanout<'a> {
    projector: &'a Projector,
    /// Per lane, the topics it reads and where its records go.
    routes: &'a [Route],
    topics: &'a BTreeMap<String, Topic>,
    ends: &'a Ends,
}

impl Fanout<'_> {
    /// Reads records and hands each to the lanes that want it, until something stops the feed.
    async fn dispatch(
        &self,
        reader: &mut PartitionReader,
        tasks: &mut JoinSet<anyhow::Result<Stop>>,
        shutdown: &CancellationToken,
        restart: &CancellationToken,
    ) -> anyhow::Result<Stop> {
        let Self { projector, routes, topics, ends } = *self;
        let stopped = |exit| Ok(Stop { exit, projection: None });
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return stopped(Exit::Shutdown),
                () = restart.cancelled() => return stopped(Exit::Reassigned),
                Some(joined) = tasks.join_next() => {
                    // A lane stopped on its own: the feed stops with it.
                    return joined.map_err(|error| anyhow::anyhow!("a projection lane panicked: {error}"))?;
                }
                message = reader.next() => match message? {
                    Some(message) => message,
                    None => return stopped(Exit::Shutdown),
                },
            };
            let key = (message.topic().to_owned(), message.partition());
            ends.learn(reader, &key);
            if !routes.iter().any(|route| route.topics.contains(&key.0)) {
                continue;
            }
            let Some(item) = read_with_retry(projector, topics.get(&key.0).copied(), message, restart).await else {
                return stopped(if shutdown.is_cancelled() { Exit::Shutdown } else { Exit::Reassigned });
            };
            let item = Arc::new(item);
            for route in routes.iter().filter(|route| route.wants(&item)) {
                tokio::select! {
                    () = shutdown.cancelled() => return stopped(Exit::Shutdown),
                    () = restart.cancelled() => return stopped(Exit::Reassigned),
                    Some(joined) = tasks.join_next() => {
                        return joined.map_err(|error| anyhow::anyhow!("a projection lane panicked: {error}"))?;
                    }
                    sent = route.sender.send(item.clone()) => {
                        if sent.is_err() {
                            // The lane ended; its task says why.
                            tracing::debug!(projection = route.name, "a lane stopped taking records");
                        }
                    }
                }
            }
        }
    }
}

/// Reads a record, waiting out a schema registry that cannot answer: a record is never skipped
/// for that. `None` once `stop` is cancelled (the feed's restart, a child of its shutdown).
async fn read_with_retry(
    projector: &Projector,
    topic: Option<Topic>,
    message: rdkafka::message::OwnedMessage,
    stop: &CancellationToken,
) -> Option<Item> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match read(&projector.codec, topic, &message).await {
            Ok(read) => return Some(Item { message, read }),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot read a record yet; retrying");
                metrics::counter!("keel_projector_read_retries_total", "topic" => message.topic().to_owned())
                    .increment(1);
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Applies what the feed hands one projection, batch by batch.
async fn run_lane(
    mut lane: Lane,
    mut receiver: mpsc::Receiver<Arc<Item>>,
    ends: Ends,
    stop: CancellationToken,
) -> anyhow::Result<Stop> {
    let name = lane.runner.projection.name();
    let (batch_size, interval) = (lane.runner.settings.batch_size, lane.runner.settings.batch_interval);
    let stopped = |exit| Ok(Stop { exit, projection: Some(name) });
    lane.record_lag(|topic, partition| ends.get(topic, partition));
    let mut last_batch = tokio::time::Instant::now() - interval;
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return stopped(Exit::Reassigned),
            item = receiver.recv() => match item {
                Some(item) => item,
                None => return stopped(Exit::Reassigned),
            },
        };
        // Under a steady stream, gather what arrives until the interval since the last batch
        // is over.
        let mut batch = vec![first];
        let gather_until = last_batch + interval;
        while batch.len() < batch_size {
            tokio::select! {
                () = tokio::time::sleep_until(gather_until) => break,
                item = receiver.recv() => match item {
                    Some(item) => batch.push(item),
                    None => break,
                },
            }
        }
        last_batch = tokio::time::Instant::now();
        while batch.len() < batch_size {
            match receiver.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        batch.retain(|item| lane.wants(item));
        if batch.is_empty() {
            continue;
        }
        // A batch once begun is applied or rolled back; a stop only ends the waits between retries.
        let applied = match lane.apply_with_retry(&batch, Guard::Live, &stop).await {
            Ok(applied) => applied,
            Err(error) if error.downcast_ref::<crate::store::CheckpointMoved>().is_some() => {
                tracing::warn!(projection = name, error = %format!("{error:#}"), "another instance applied these records; restarting");
                return stopped(Exit::Reassigned);
            }
            Err(error) => return Err(error),
        };
        match applied {
            Some(Batch::Applied { .. }) => lane.record_lag(|topic, partition| ends.get(topic, partition)),
            Some(Batch::Superseded) => return stopped(Exit::Superseded),
            Some(Batch::Stopped) => return stopped(Exit::Stopped),
            None => return stopped(Exit::Reassigned),
        }
    }
}
