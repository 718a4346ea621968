//! `GET /v1/streams/{stream}`, `GET /v1/streams/{stream}/{id}` and `GET /v1/streams/audit`: live
//! events as Server-Sent Events. Who may watch what is the route table's: a whole topic needs
//! `streams:read:any`, the audit stream `audit:read:any`, one aggregate `streams:read` for its
//! owner (found here, in the read models).
//!
//! A stream is a topic by its alias (`users`, `posts`, …), every topic (`audit`), or one aggregate
//! of a topic (`/v1/streams/posts/{id}`), filtered by event type (`?type=PostPublished,…`). It
//! starts at `?from=latest` (the default), `earliest`, an RFC 3339 time, or a cursor — and a
//! `Last-Event-ID` header (what browsers send when they reconnect) resumes exactly after the last
//! event received. Events before the hub's position come from the audit log (already validated
//! and redacted), the rest live from the gateway's one consumer per topic ([`hub`]). Within a
//! partition events come in log order; partitions interleave.
//!
//! A client whose buffer (`gateway.streams.buffer` events) fills is cut off: it gets what was
//! buffered, then a final `lagged` event whose `id` and `resume` are where to resume. At
//! shutdown streams end with an `end` event carrying the same. Heartbeats (SSE comments) keep
//! idle connections open.

pub mod cursor;
mod history;
pub mod hub;
pub mod sse;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Extension,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use chrono::DateTime;
use futures::FutureExt;
use keel_read_models::{blog, sessions};
use keel_topics::{Topic, kafka, partitioning};
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::{
    cursor::{Cursor, Position},
    history::Range,
    hub::{Filter, Hub, HubContext, StreamEvent, Subscriber},
};
use crate::{
    AppState, pagination,
    problem::Problem,
    security::{Access, Caller, Decision},
};

/// The `gateway.streams` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Events buffered per client; a client further behind is cut off with its resume position.
    pub buffer: usize,
    /// Seconds between heartbeats on an idle stream.
    pub heartbeat_secs: u64,
    /// How long a stream that starts in the past waits for the audit log to reach the present.
    pub history_wait_ms: u64,
    /// Streams open at once on this gateway; more are refused with 503.
    pub max_clients: usize,
    /// A client that takes nothing for this long (its connection does not drain) loses its
    /// stream, its buffer and its place: it resumes from the last event it received.
    pub stall_timeout_ms: u64,
}

impl StreamsConfig {
    pub fn validate(&self) -> Result<(), keel_runtime::ConfigError> {
        use keel_runtime::config::ensure;
        ensure(self.buffer > 0, "gateway.streams.buffer", "must be positive")?;
        ensure(self.heartbeat_secs > 0, "gateway.streams.heartbeat_secs", "must be positive")?;
        ensure(self.max_clients > 0, "gateway.streams.max_clients", "must be positive")?;
        ensure(self.stall_timeout_ms > 0, "gateway.streams.stall_timeout_ms", "must be positive")
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self { buffer: 256, heartbeat_secs: 15, history_wait_ms: 10_000, max_clients: 10_000, stall_timeout_ms: 30_000 }
    }
}

/// The streams of a gateway: its hubs, made on first use, and its limits.
pub struct Streams {
    context: HubContext,
    hubs: Mutex<HashMap<Topic, Arc<OnceCell<Arc<Hub>>>>>,
    config: StreamsConfig,
    /// Watermark and time look-ups.
    queries: Arc<BaseConsumer>,
    clients: Arc<AtomicUsize>,
}

impl Streams {
    pub fn new(context: HubContext, config: StreamsConfig) -> anyhow::Result<Self> {
        let queries = Arc::new(kafka::client_config(&context.kafka).create()?);
        Ok(Self { context, hubs: Mutex::default(), config, queries, clients: Arc::default() })
    }

    pub fn kafka(&self) -> &keel_runtime::KafkaConfig {
        &self.context.kafka
    }

    async fn hub(&self, topic: Topic) -> Result<Arc<Hub>, Problem> {
        let cell = {
            let mut hubs = self.hubs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let cell = hubs.entry(topic).or_default();
            // A hub whose reader died (a panic) is replaced, so its topic streams again.
            if cell.get().is_some_and(|hub| !hub.is_running()) && !self.context.shutdown.is_cancelled() {
                tracing::warn!(%topic, "a stream hub stopped; starting a new one");
                *cell = Arc::default();
            }
            cell.clone()
        };
        cell.get_or_try_init(|| Hub::start(&self.context, topic)).await.cloned().map_err(|error| {
            tracing::error!(%topic, error = %format!("{error:#}"), "failed to start a stream hub");
            Problem::from_code(keel_proto::ErrorCode::Unavailable)
        })
    }

    /// Per partition of `topic`, the offset a start point names.
    async fn offsets(&self, topic: Topic, from: &Start) -> Result<Vec<i64>, Problem> {
        let (queries, name, partitions) =
            (self.queries.clone(), self.context.names.name(topic), topic.spec().partitions);
        let from = from.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<i64>, rdkafka::error::KafkaError> {
            let timeout = Duration::from_secs(5);
            match from {
                Start::Earliest => Ok(vec![0; partitions as usize]),
                Start::Latest => (0..partitions)
                    .map(|partition| Ok(queries.fetch_watermarks(&name, partition, timeout)?.1))
                    .collect(),
                Start::Time(millis) => {
                    let mut wanted = TopicPartitionList::new();
                    for partition in 0..partitions {
                        wanted.add_partition_offset(&name, partition, Offset::Offset(millis))?;
                    }
                    let found = queries.offsets_for_times(wanted, timeout)?;
                    (0..partitions)
                        .map(|partition| {
                            let offset = found.find_partition(&name, partition).map(|element| element.offset());
                            match offset {
                                Some(Offset::Offset(offset)) => Ok(offset),
                                // Nothing stamped at or after the time: from the end.
                                _ => Ok(queries.fetch_watermarks(&name, partition, timeout)?.1),
                            }
                        })
                        .collect()
                }
                Start::Cursor(_) => unreachable!("a cursor names its positions"),
            }
        })
        .await
        .map_err(|_| Problem::internal())?
        .map_err(|error| {
            tracing::warn!(%error, "failed to look up stream positions");
            Problem::from_code(keel_proto::ErrorCode::Unavailable)
        })
    }
}

/// Where a stream starts.
#[derive(Debug, Clone)]
enum Start {
    Latest,
    Earliest,
    /// Milliseconds since the epoch.
    Time(i64),
    Cursor(Cursor),
}

impl Start {
    fn parse(text: &str) -> Result<Self, Problem> {
        match text {
            "latest" => Ok(Self::Latest),
            "earliest" => Ok(Self::Earliest),
            _ if text.starts_with("c1.") => Cursor::decode(text)
                .map(Self::Cursor)
                .ok_or_else(|| Problem::bad_request("`from` / `Last-Event-ID` is not a cursor of a stream")),
            _ => match DateTime::parse_from_rfc3339(text).map(|time| time.timestamp_millis()) {
                // Kafka's log times start at the epoch (negative numbers are special offsets).
                Ok(millis) if millis >= 0 => Ok(Self::Time(millis)),
                Ok(_) => Err(Problem::bad_request("`from` must not be before 1970")),
                Err(_) => {
                    Err(Problem::bad_request("`from` must be latest, earliest, an RFC 3339 time or a stream's cursor"))
                }
            },
        }
    }
}

/// The topics of a stream alias.
fn topics_of(alias: &str) -> Option<&'static [Topic]> {
    Some(match alias {
        "users" => &[Topic::IdentityUsers],
        "sessions" => &[Topic::AuthSessions],
        "roles" => &[Topic::AuthzRoles],
        "grants" => &[Topic::AuthzUserRoles],
        "posts" => &[Topic::BlogPosts],
        "comments" => &[Topic::BlogComments],
        "audit" => Topic::ALL,
        _ => return None,
    })
}

const ALIASES: &str = "users, sessions, roles, grants, posts, comments, audit";

/// Whose `aggregate` of the stream `alias` is, from the read models; `None` when it belongs to
/// nobody (only those allowed any may watch it). A missing aggregate is `404`.
async fn owner(state: &AppState, alias: &str, aggregate: Uuid) -> Result<Option<Uuid>, Problem> {
    let pool = &state.pool;
    let owner = match alias {
        "users" | "grants" => return Ok(Some(aggregate)),
        "sessions" => sessions::owner(pool, aggregate).await,
        "posts" => blog::post_author(pool, aggregate).await,
        "comments" => blog::comment_author(pool, aggregate).await,
        _ => return Ok(None),
    }
    .map_err(|error| {
        tracing::error!(%error, "failed to look up a stream's owner");
        Problem::from_code(keel_proto::ErrorCode::Unavailable)
    })?;
    owner.map(Some).ok_or_else(|| Problem::not_found(format!("no {alias} aggregate {aggregate}")))
}

/// `GET /v1/streams/{stream}`: a whole topic.
pub(crate) async fn topic(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(access): Extension<Access>,
    Path(alias): Path<String>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Problem> {
    let permission = (permission_of(access)?, None);
    open(state, caller, permission, alias, None, headers, query).await
}

/// `GET /v1/streams/audit`: every topic.
pub(crate) async fn audit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(access): Extension<Access>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Problem> {
    let permission = (permission_of(access)?, None);
    open(state, caller, permission, AUDIT.to_owned(), None, headers, query).await
}

/// `GET /v1/streams/{stream}/{id}`: one aggregate, for its owner (as authz allows: "own" is
/// checked here against the aggregate's owner in the read models) or anyone allowed any.
pub(crate) async fn aggregate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(access): Extension<Access>,
    Extension(decision): Extension<Decision>,
    Path((alias, id)): Path<(String, String)>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Problem> {
    let id = crate::commands::parse_id(&id, "aggregate")?;
    topics_of(&alias).ok_or_else(|| unknown_stream(&alias))?;
    if alias == AUDIT {
        return Err(Problem::not_found("the audit stream has no aggregates"));
    }
    let owner = owner(&state, &alias, id).await?;
    let allowed = match decision {
        Decision::Allow => true,
        Decision::AllowOwn => owner.is_some() && owner == caller.user(),
        Decision::Deny => false,
    };
    if !allowed {
        return Err(forbidden());
    }
    open(state, caller, (permission_of(access)?, owner), alias, Some(id), headers, query).await
}

/// The alias of the stream of every topic.
const AUDIT: &str = "audit";

fn unknown_stream(alias: &str) -> Problem {
    Problem::not_found(format!("no stream `{alias}`; streams: {ALIASES}"))
}

fn forbidden() -> Problem {
    Problem::from_code(keel_proto::ErrorCode::PermissionDenied).detail("you may not watch this stream")
}

/// The permission a stream route needs (every one needs one; the route table says which).
fn permission_of(access: Access) -> Result<&'static str, Problem> {
    access.action().ok_or_else(|| {
        tracing::error!(?access, "a stream route without a permission");
        Problem::internal()
    })
}

/// Opens a stream the pipeline and the route allowed `caller` to watch; `permission` is what it
/// is rechecked against while open.
async fn open(
    state: AppState,
    caller: Caller,
    permission: (&'static str, Option<Uuid>),
    alias: String,
    aggregate: Option<Uuid>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, Problem> {
    let topics = topics_of(&alias).ok_or_else(|| unknown_stream(&alias))?;
    let Query(pairs) = query.map_err(|_| Problem::bad_request("the query string is malformed"))?;
    let params = pagination::params(pairs, &["from", "type"])?;
    let Caller::User { id: user, session, expires_at } = caller else {
        return Err(Problem::from_code(keel_proto::ErrorCode::Unauthenticated));
    };
    let filter = Arc::new(Filter {
        aggregate,
        types: params.get("type").map(|types| {
            types.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect::<HashSet<_>>()
        }),
    });
    let last_event_id = headers.get("last-event-id").map(|value| value.to_str().map(str::to_owned));
    let start = match (last_event_id, params.get("from")) {
        (Some(Ok(id)), _) => Start::parse(&id)?,
        (Some(Err(_)), _) => return Err(Problem::bad_request("`Last-Event-ID` is not a cursor of a stream")),
        (None, Some(from)) => Start::parse(from)?,
        (None, None) => Start::Latest,
    };
    let streams = &state.streams;
    let guard = ClientGuard::new(streams.clients.clone());
    if guard.open_before >= streams.config.max_clients {
        return Err(Problem::from_code(keel_proto::ErrorCode::Overloaded).detail("too many streams are open"));
    }
    let partitions: Vec<(Topic, i32)> = topics
        .iter()
        .flat_map(|topic| (0..topic.spec().partitions).map(move |partition| (*topic, partition)))
        .collect();
    let cursor = match start {
        Start::Cursor(cursor) if cursor.covers(&partitions) => cursor,
        Start::Cursor(_) => return Err(Problem::bad_request("the cursor is not one of this stream")),
        start => {
            let mut cursor = Cursor::default();
            for topic in topics {
                for (partition, offset) in streams.offsets(*topic, &start).await?.into_iter().enumerate() {
                    cursor.set(*topic, partition as i32, Position::at_offset(offset));
                }
            }
            cursor
        }
    };

    let (sender, receiver) = mpsc::channel(streams.config.buffer.max(1));
    let subscriber = Subscriber { filter: filter.clone(), sender, cut: CancellationToken::new() };
    let mut ranges = VecDeque::new();
    for topic in topics {
        let hub = streams.hub(*topic).await?;
        let from: Vec<Position> =
            (0..hub.partitions()).map(|partition| cursor.get(*topic, partition).unwrap_or(Position::START)).collect();
        let head = hub.subscribe(subscriber.clone(), from.clone());
        // An aggregate lives in one partition: its history is there only.
        let only = aggregate.map(|id| partitioning::partition_of(id.to_string().as_bytes(), hub.partitions()));
        for (partition, (from, head)) in from.iter().zip(head).enumerate() {
            let partition = partition as i32;
            if *from < Position::at_offset(head) && only.is_none_or(|only| only == partition) {
                ranges.push_back(Range { topic: *topic, partition, from: *from, until_offset: head });
            }
        }
    }
    let ranges: Vec<Range> = ranges.into_iter().collect();
    if !ranges.is_empty() {
        let wait = Duration::from_millis(streams.config.history_wait_ms);
        history::wait_until_audited(&state.pool, &state.names, &ranges, wait).await.map_err(|error| {
            tracing::warn!(%error, "a stream's history is not available");
            Problem::from_code(keel_proto::ErrorCode::Unavailable)
                .detail("the stream's history is not ready yet; retry")
        })?;
    }
    metrics::counter!("keel_streams_opened_total", "stream" => stream_label(&alias)).increment(1);
    let expires_at = DateTime::from_timestamp(expires_at, 0).unwrap_or_default();
    let token_left = (expires_at - chrono::Utc::now()).to_std().unwrap_or_default();
    let feed = Feed {
        state: state.clone(),
        viewer: Viewer {
            user,
            session,
            permission,
            expires: tokio::time::Instant::now() + token_left,
            recheck: tokio::time::interval_at(tokio::time::Instant::now() + ACCESS_RECHECK, ACCESS_RECHECK),
        },
        filter,
        cursor,
        ranges: ranges.into(),
        buffered: VecDeque::new(),
        receiver,
        cut: subscriber.cut,
        shutdown: state.streams.context.shutdown.clone(),
        announced: false,
        done: false,
        _guard: guard,
    };
    // The feed runs on its own, so it ends (a token expiring, a session ending, shutdown, a
    // client that takes nothing) even while the connection cannot be written to.
    let (events, body) = mpsc::channel(1);
    tokio::spawn(feed.pump(events, Duration::from_millis(streams.config.stall_timeout_ms)));
    let body = futures::stream::unfold(body, |mut body| async move {
        let event = body.recv().await?;
        Some((Ok::<_, Infallible>(event), body))
    });
    let heartbeat = Duration::from_secs(streams.config.heartbeat_secs.max(1));
    let mut response = Sse::new(body).keep_alive(KeepAlive::new().interval(heartbeat)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies that buffer would hold events back.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

fn stream_label(alias: &str) -> &'static str {
    match alias {
        "users" => "users",
        "sessions" => "sessions",
        "roles" => "roles",
        "grants" => "grants",
        "posts" => "posts",
        "comments" => "comments",
        _ => "audit",
    }
}

/// Counts a stream while it is open.
struct ClientGuard {
    open: Arc<AtomicUsize>,
    /// Streams open before this one.
    open_before: usize,
}

impl ClientGuard {
    fn new(open: Arc<AtomicUsize>) -> Self {
        let open_before = open.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!("keel_streams_open").increment(1.0);
        Self { open, open_before }
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("keel_streams_open").decrement(1.0);
    }
}

/// How often an open stream checks that its session and user are still active and that it may
/// still be watched: logging out, being deactivated or losing the permission ends it within this
/// (plus the caches' lifetimes, should their invalidations be lost).
const ACCESS_RECHECK: Duration = Duration::from_secs(5);

/// Why a stream ends at shutdown, and when its token expires (checked while waiting on the
/// hub, and between history events).
const SHUTTING_DOWN: &str = "the gateway is shutting down; resume elsewhere";
const TOKEN_EXPIRED: &str = "the access token expired; resume with a fresh one";

/// Who a stream is for; it ends when their token expires, their session ends, or they lose the
/// permission it needs.
struct Viewer {
    user: Uuid,
    session: Uuid,
    /// The action and owner the stream was allowed for.
    permission: (&'static str, Option<Uuid>),
    expires: tokio::time::Instant,
    recheck: tokio::time::Interval,
}

impl Viewer {
    /// Why the stream must end now, if it must: the session or the user is no longer active, or
    /// the permission was taken away. What cannot be read now counts as unchanged: the stream
    /// was allowed, and a database or authz hiccup should not drop every stream.
    async fn withdrawn(&self, state: &AppState) -> Option<&'static str> {
        let status = &state.security.status;
        if status.session_revoked(self.session).await.unwrap_or(false)
            || !status.user_active(self.user).await.unwrap_or(true)
        {
            return Some("the session ended");
        }
        let (action, owner) = self.permission;
        match state.security.permissions.check(self.user, action, owner).await {
            Ok(Decision::Allow) | Err(_) => None,
            Ok(_) => Some("you may no longer watch this stream"),
        }
    }
}

/// One client's stream: history first, then live events, then a final event.
struct Feed {
    state: AppState,
    viewer: Viewer,
    filter: Arc<Filter>,
    cursor: Cursor,
    ranges: VecDeque<Range>,
    buffered: VecDeque<StreamEvent>,
    receiver: mpsc::Receiver<Arc<StreamEvent>>,
    cut: CancellationToken,
    shutdown: CancellationToken,
    /// Whether the starting cursor was sent (an event with only an `id`), so that a client that
    /// loses its connection before the first event resumes from where it started.
    announced: bool,
    done: bool,
    _guard: ClientGuard,
}

#[derive(Serialize)]
struct Final<'a> {
    reason: &'a str,
    resume: String,
}

impl Feed {
    /// Hands the feed's events to the connection until the feed ends, the client leaves, or the
    /// connection takes nothing for `stall`.
    async fn pump(mut self, out: mpsc::Sender<Event>, stall: Duration) {
        loop {
            // A client that left is let go at once, even on a quiet stream.
            let event = tokio::select! {
                event = self.next() => event,
                () = out.closed() => return,
            };
            let Some(event) = event else { return };
            // Sending first: a final event made because of shutdown or expiry still goes out
            // when the connection takes it; only a connection that does not is given up.
            tokio::select! {
                biased;
                sent = out.send(event) => if sent.is_err() { return },
                () = tokio::time::sleep(stall) => {
                    metrics::counter!("keel_stream_stalled_total").increment(1);
                    tracing::info!(user = %self.viewer.user, "a stream client took nothing for too long; dropped");
                    return;
                }
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep_until(self.viewer.expires) => return,
            }
        }
    }

    /// The final event due now, if any, without waiting: for the history phase, which reads
    /// from the database rather than waiting on the hub.
    async fn due_end(&mut self) -> Option<Event> {
        if self.shutdown.is_cancelled() {
            return Some(self.last("end", SHUTTING_DOWN));
        }
        if tokio::time::Instant::now() >= self.viewer.expires {
            return Some(self.last("end", TOKEN_EXPIRED));
        }
        if self.viewer.recheck.tick().now_or_never().is_some()
            && let Some(reason) = self.viewer.withdrawn(&self.state).await
        {
            return Some(self.last("end", reason));
        }
        None
    }

    /// The SSE event of a stream event, its `id` the cursor after it; `None` for one already
    /// delivered (a live event the history phase sent too).
    fn deliver(&mut self, event: &StreamEvent) -> Option<Event> {
        if self.cursor.get(event.topic, event.partition).is_some_and(|next| event.position < next) {
            return None;
        }
        self.cursor.advance(event.topic, event.partition, event.position);
        metrics::counter!("keel_stream_events_delivered_total").increment(1);
        Some(Event::default().id(self.cursor.encode()).data(&event.json))
    }

    /// The final event of a client a hub cut off.
    fn lagged(&mut self) -> Event {
        metrics::counter!("keel_stream_lagged_total").increment(1);
        self.last("lagged", "the client fell behind; resume from here")
    }

    fn last(&mut self, name: &str, reason: &str) -> Event {
        self.done = true;
        let resume = self.cursor.encode();
        let data = serde_json::to_string(&Final { reason, resume: resume.clone() }).unwrap_or_default();
        Event::default().event(name).id(resume).data(data)
    }

    async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        if !self.announced {
            self.announced = true;
            return Some(Event::default().id(self.cursor.encode()));
        }
        loop {
            if (!self.buffered.is_empty() || !self.ranges.is_empty())
                && let Some(end) = self.due_end().await
            {
                return Some(end);
            }
            if let Some(event) = self.buffered.pop_front() {
                if let Some(sse) = self.deliver(&event) {
                    return Some(sse);
                }
                continue;
            }
            if let Some(range) = self.ranges.front_mut() {
                match history::page(&self.state.pool, &self.state.names, range, &self.filter).await {
                    Ok(page) => {
                        match page.last() {
                            Some(last) if page.len() as i64 >= history::PAGE => range.from = last.position.next(),
                            _ => {
                                self.ranges.pop_front();
                            }
                        }
                        self.buffered.extend(page);
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "failed to read a stream's history");
                        return Some(self.last("end", "the stream's history cannot be read now; resume"));
                    }
                }
            }
            let event = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Some(self.last("end", SHUTTING_DOWN)),
                () = tokio::time::sleep_until(self.viewer.expires) => {
                    return Some(self.last("end", TOKEN_EXPIRED));
                }
                _ = self.viewer.recheck.tick() => {
                    if let Some(reason) = self.viewer.withdrawn(&self.state).await {
                        return Some(self.last("end", reason));
                    }
                    continue;
                }
                event = self.receiver.recv() => event,
                () = self.cut.cancelled() => match self.receiver.try_recv() {
                    Ok(event) => Some(event),
                    Err(_) => return Some(self.lagged()),
                },
            };
            match event {
                Some(event) => {
                    if let Some(sse) = self.deliver(&event) {
                        return Some(sse);
                    }
                }
                None if self.cut.is_cancelled() => return Some(self.lagged()),
                None => return Some(self.last("end", "the stream's source stopped; resume")),
            }
        }
    }
}
