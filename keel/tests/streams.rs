//! Live event streams on real servers: resuming across forced disconnects without a gap or a
//! repeat, a slow client cut off while a fast one keeps up, a thousand clients in bounded
//! memory, what a stream shows and refuses, `keel tail`, and the end of a stream (logout,
//! shutdown).

mod support;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use keel_gateway::streams::sse::{SseEvent, SseParser};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{ALL_ROLES, Account, Platform, Role, eventually};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::{Instant, timeout},
};
use tokio_util::bytes::Bytes;

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A client of one stream, reading as fast as it can.
struct Subscription {
    body: Body,
    parser: SseParser,
    queue: VecDeque<SseEvent>,
}

impl Subscription {
    async fn open(client: &reqwest::Client, url: &str, token: &str, last_id: Option<&str>) -> Self {
        let response = Self::request(client, url, token, last_id).await;
        assert_eq!(response.status(), StatusCode::OK, "{url}: {}", response.text().await.unwrap_or_default());
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let parser = SseParser::resuming(last_id.map(str::to_owned));
        Self { body: Box::pin(response.bytes_stream()), parser, queue: VecDeque::new() }
    }

    /// Opens the stream once the gateway allows it (what it depends on may still be on its way
    /// to the read models).
    async fn open_when_allowed(client: &reqwest::Client, url: &str, token: &str, what: &str) -> Self {
        eventually(Duration::from_secs(30), what, || async {
            let response = Self::request(client, url, token, None).await;
            (response.status() == StatusCode::OK).then_some(())
        })
        .await;
        Self::open(client, url, token, None).await
    }

    async fn request(client: &reqwest::Client, url: &str, token: &str, last_id: Option<&str>) -> reqwest::Response {
        let mut request = client.get(url).bearer_auth(token);
        if let Some(id) = last_id {
            request = request.header("last-event-id", id);
        }
        request.send().await.unwrap()
    }

    /// The next event, `None` when the stream ends (or breaks) or nothing comes within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(event);
            }
            match timeout(deadline.saturating_duration_since(Instant::now()), self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.queue.extend(self.parser.push(&chunk)),
                Ok(Some(Err(_)) | None) | Err(_) => return None,
            }
        }
    }

    /// The next data event, asserting it is one.
    async fn event(&mut self, wait: Duration) -> Value {
        let event = self.next(wait).await.expect("an event within the wait");
        assert_eq!(event.event, "message", "{event:?}");
        serde_json::from_str(&event.data).unwrap()
    }
}

fn roles_and(extra: &[Role]) -> Vec<Role> {
    ALL_ROLES.iter().chain(extra).copied().collect()
}

/// Starts every role, the gateway with `gateway_env`.
async fn platform_with_gateway(gateway_env: &[(&str, &str)]) -> Platform {
    let mut platform = Platform::prepare().await;
    platform.spawn(Role::Registry);
    platform.wait_ready(Role::Registry, Duration::from_secs(90)).await;
    for role in ALL_ROLES.iter().filter(|role| **role != Role::Registry) {
        match role {
            Role::Gateway => platform.spawn_with(*role, gateway_env),
            _ => platform.spawn(*role),
        }
    }
    for role in ALL_ROLES.iter().filter(|role| **role != Role::Registry) {
        platform.wait_ready(*role, Duration::from_secs(90)).await;
    }
    platform
}

/// Drafts `count` posts through `gateway`, 16 at a time; returns their ids.
async fn draft_posts(
    client: &reqwest::Client,
    gateway: &str,
    writer: &Account,
    count: usize,
    body: &str,
) -> HashSet<String> {
    futures::stream::iter(0..count)
        .map(|index| async move {
            let response = client
                .post(format!("{gateway}/v1/posts"))
                .bearer_auth(&writer.access_token)
                .json(&json!({"title": format!("Post {index}"), "body": body}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::CREATED);
            response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
        })
        .buffer_unordered(16)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_resumes_5000_events_across_three_forced_disconnects_and_sees_each_once() {
    const EVENTS: usize = 5000;
    let mut platform = Platform::start_roles(&roles_and(&[Role::SecondGateway])).await;
    let client = reqwest::Client::new();
    let admin = platform.admin(&client).await;
    let writer = platform.signup(&client, "writer@example.com", "Writer").await;
    let gateway = platform.gateway_url.clone();
    let mut url = format!("{gateway}/v1/streams/posts?from=earliest");
    let mut stream = Subscription::open(&client, &url, &admin.access_token, None).await;

    // Writes go through the second gateway, so they go on while the first one is down.
    let second = platform.admin_url(Role::SecondGateway).to_owned();
    let second_url = format!("{second}/v1/streams/posts?from=earliest");
    let writes = {
        let (client, writer) = (client.clone(), writer.clone());
        tokio::spawn(async move { draft_posts(&client, &second, &writer, EVENTS, "Body.").await })
    };

    let mut seen: HashMap<String, String> = HashMap::new();
    let mut duplicates = Vec::new();
    let mut reconnects = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.len() < EVENTS {
        assert!(Instant::now() < deadline, "only {} of {EVENTS} events arrived", seen.len());
        match stream.next(Duration::from_secs(30)).await {
            Some(event) if event.event == "message" => {
                let value: Value = serde_json::from_str(&event.data).unwrap();
                let event_id = value["event_id"].as_str().unwrap().to_owned();
                let aggregate = value["aggregate_id"].as_str().unwrap().to_owned();
                assert_eq!(value["event_type"], "PostDrafted");
                if seen.insert(event_id.clone(), aggregate).is_some() {
                    duplicates.push(event_id);
                }
            }
            // A final event (the gateway shutting down) or a broken connection: resume.
            _ => {
                let last = stream.parser.last_id.clone();
                stream = Subscription::open(&client, &url, &admin.access_token, last.as_deref()).await;
                continue;
            }
        }
        // The forced disconnects: the client drops the connection twice (the second time to
        // resume on the other gateway, whose hub never saw the first position), and the gateway
        // dies under it once (SIGKILL: no final event), to come back from the audit log.
        let disconnect_at = [1000, 2500, 4000];
        if disconnect_at.contains(&seen.len()) {
            reconnects += 1;
            let last = stream.parser.last_id.clone().expect("events carry ids");
            drop(stream);
            if seen.len() == 2500 {
                platform.kill9(Role::Gateway);
                platform.spawn(Role::Gateway);
                platform.wait_ready(Role::Gateway, Duration::from_secs(90)).await;
            }
            if seen.len() == 4000 {
                url = second_url.clone();
            }
            stream = Subscription::open(&client, &url, &admin.access_token, Some(&last)).await;
        }
    }
    let written = writes.await.unwrap();
    assert!(duplicates.is_empty(), "{} events came twice, e.g. {:?}", duplicates.len(), &duplicates[..1]);
    assert_eq!(reconnects, 3);
    let aggregates: HashSet<String> = seen.values().cloned().collect();
    assert_eq!(aggregates, written, "the stream's posts are exactly the posts written");
    // And nothing more comes: no late repeat.
    let extra = stream.next(Duration::from_secs(2)).await;
    assert!(extra.as_ref().is_none_or(|event| event.event != "message"), "an extra event: {extra:?}");
}

/// A client that reads nothing: its socket's receive buffer is tiny, so the gateway's writes
/// stall at once. Returns the socket, with the request sent.
async fn stalled_client(gateway: &str, path: &str, token: &str) -> tokio::net::TcpStream {
    let address: std::net::SocketAddr = gateway.strip_prefix("http://").unwrap().parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(address).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// The body of a chunked HTTP/1.1 response, read to the end.
async fn read_chunked(mut stream: tokio::net::TcpStream) -> (String, Vec<u8>) {
    let mut raw = Vec::new();
    timeout(Duration::from_secs(120), stream.read_to_end(&mut raw)).await.expect("the response ends").unwrap();
    let split = raw.windows(4).position(|window| window == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut rest = &raw[split + 4..];
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|window| window == b"\r\n").expect("a chunk size");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (head, body);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_client_is_cut_off_with_its_resume_position_while_a_fast_one_gets_everything() {
    const EVENTS: usize = 2000;
    // The slow client stalls for as long as the writes take: its stream is not dropped for it.
    let platform = platform_with_gateway(&[("KEEL_GATEWAY__STREAMS__STALL_TIMEOUT_MS", "300000")]).await;
    let client = reqwest::Client::new();
    let admin = platform.admin(&client).await;
    let gateway = platform.gateway_url.clone();
    let path = "/v1/streams/posts?from=latest";
    let mut fast = Subscription::open(&client, &format!("{gateway}{path}"), &admin.access_token, None).await;
    let slow = stalled_client(&gateway, path, &admin.access_token).await;
    // The slow client's stream is open (it counts as a subscription) before anything is written.
    eventually(Duration::from_secs(10), "both subscriptions", || async {
        let open = platform.metric(Role::Gateway, "keel_stream_subscriptions{topic=\"blog.posts\"}").await;
        (open == Some(2.0)).then_some(())
    })
    .await;

    // The fast client reads all along.
    let fast = tokio::spawn(async move {
        let mut seen = HashSet::new();
        while seen.len() < EVENTS {
            let event = fast.event(Duration::from_secs(30)).await;
            assert!(seen.insert(event["event_id"].as_str().unwrap().to_owned()), "the fast client got a repeat");
        }
        seen
    });
    let body = "x".repeat(4000);
    let written = draft_posts(&client, &gateway, &admin, EVENTS, &body).await;
    let fast_seen = fast.await.expect("the fast client gets every event, never cut off");
    // The fast client has everything while the slow one still reads nothing.
    let cut = platform.metric(Role::Gateway, "keel_stream_cut_total{topic=\"blog.posts\"}").await;
    assert_eq!(cut, Some(1.0), "exactly one client was cut off");

    let (head, body) = read_chunked(slow).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut parser = SseParser::default();
    let events = parser.push(&body);
    let (last, received) = events.split_last().expect("events, then a final one");
    assert_eq!(last.event, "lagged", "the slow client's stream ends with `lagged`: {last:?}");
    let resume = serde_json::from_str::<Value>(&last.data).unwrap()["resume"].as_str().unwrap().to_owned();
    assert_eq!(last.id.as_deref(), Some(resume.as_str()));
    assert!(!received.is_empty() && received.len() < EVENTS, "{} events before the cut", received.len());
    eprintln!("the slow client got {} of {EVENTS} events before the cut", received.len());
    let mut slow_seen: HashSet<String> = received
        .iter()
        .map(|event| serde_json::from_str::<Value>(&event.data).unwrap()["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(slow_seen.len(), received.len());

    // Resuming from the final event's position, it gets the rest, each once.
    let mut resumed =
        Subscription::open(&client, &format!("{gateway}{path}"), &admin.access_token, Some(&resume)).await;
    let mut aggregates = HashSet::new();
    while slow_seen.len() < EVENTS {
        let event = resumed.event(Duration::from_secs(30)).await;
        assert!(slow_seen.insert(event["event_id"].as_str().unwrap().to_owned()), "a repeat after resuming");
        aggregates.insert(event["aggregate_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(slow_seen, fast_seen);
    assert!(aggregates.is_subset(&written));
}

/// The gateway's resident memory, from its metrics.
async fn gateway_memory(platform: &Platform) -> f64 {
    platform.metric(Role::Gateway, "keel_process_resident_memory_bytes").await.expect("the gateway reports its memory")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_clients_get_every_event_in_bounded_memory_and_one_more_is_refused() {
    const CLIENTS: usize = 1000;
    const EVENTS: usize = 100;
    /// The bound on what 1,000 open streams (with their buffers in use) add to the gateway.
    const BOUND: f64 = 64.0 * 1024.0 * 1024.0;
    let platform = platform_with_gateway(&[("KEEL_GATEWAY__STREAMS__MAX_CLIENTS", "1000")]).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let admin = platform.admin(&client).await;
    let gateway = platform.gateway_url.clone();
    let url = format!("{gateway}/v1/streams/posts?from=latest");
    // The hub exists and the gateway is warm before the baseline.
    drop(Subscription::open(&client, &url, &admin.access_token, None).await);
    draft_posts(&client, &gateway, &admin, 10, "Warm-up.").await;
    eventually(Duration::from_secs(30), "the warm-up stream to be let go", || async {
        (platform.metric(Role::Gateway, "keel_streams_open").await == Some(0.0)).then_some(())
    })
    .await;
    let baseline = gateway_memory(&platform).await;

    let received = Arc::new(AtomicU64::new(0));
    let mut subscriptions = Vec::new();
    for _ in 0..CLIENTS {
        subscriptions.push(Subscription::open(&client, &url, &admin.access_token, None).await);
    }
    let refused = Subscription::request(&client, &url, &admin.access_token, None).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    let readers: Vec<_> = subscriptions
        .into_iter()
        .map(|mut subscription| {
            let received = received.clone();
            tokio::spawn(async move {
                let mut seen = HashSet::new();
                while seen.len() < EVENTS {
                    let event = subscription.event(Duration::from_secs(60)).await;
                    assert!(seen.insert(event["event_id"].as_str().unwrap().to_owned()));
                    received.fetch_add(1, Ordering::Relaxed);
                }
                subscription
            })
        })
        .collect();
    draft_posts(&client, &gateway, &admin, EVENTS, &"y".repeat(1000)).await;
    let mut open = Vec::new();
    for reader in readers {
        open.push(reader.await.expect("every client gets every event"));
    }
    assert_eq!(received.load(Ordering::Relaxed), (CLIENTS * EVENTS) as u64);
    let loaded = gateway_memory(&platform).await;
    let peak = platform.metric(Role::Gateway, "keel_process_resident_memory_peak_bytes").await.unwrap();
    let mib = |bytes: f64| bytes / 1024.0 / 1024.0;
    eprintln!(
        "gateway memory: {:.1} MiB idle, {:.1} MiB with {CLIENTS} streams ({:.1} KiB each), peak {:.1} MiB",
        mib(baseline),
        mib(loaded),
        (loaded - baseline) / CLIENTS as f64 / 1024.0,
        mib(peak)
    );
    assert!(peak - baseline < BOUND, "{CLIENTS} streams took {:.1} MiB", mib(peak - baseline));
    drop(open);
    eventually(Duration::from_secs(30), "closed streams to be let go", || async {
        let open = platform.metric(Role::Gateway, "keel_streams_open").await;
        (open == Some(0.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_filter_start_where_asked_redact_refuse_and_end() {
    let mut platform = platform_with_gateway(&[
        ("KEEL_GATEWAY__STREAMS__HEARTBEAT_SECS", "1"),
        ("KEEL_GATEWAY__STREAMS__STALL_TIMEOUT_MS", "3000"),
    ])
    .await;
    let client = reqwest::Client::new();
    let gateway = platform.gateway_url.clone();
    let admin = platform.admin(&client).await;
    let author = platform.signup(&client, "author@example.com", "Ada Author").await;
    let command = |path: String, body: Value| {
        let request = client.post(format!("{gateway}{path}")).bearer_auth(&author.access_token).json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{}", response.status());
            response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
        }
    };

    // Refusals are problems, before any stream opens.
    for (path, status) in [
        ("/v1/streams/nope", 404),
        ("/v1/streams/posts?from=yesterday", 400),
        ("/v1/streams/posts?from=c1.%25%25", 400),
        ("/v1/streams/posts?color=red", 400),
        (&format!("/v1/streams/audit/{}", author.id), 404),
        ("/v1/streams/posts/not-a-uuid", 400),
        (&format!("/v1/streams/posts/{}", uuid::Uuid::new_v4()), 404),
    ] {
        let response = client.get(format!("{gateway}{path}")).bearer_auth(&admin.access_token).send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        assert_eq!(response.headers()["content-type"], "application/problem+json", "{path}");
    }
    // A cursor of another stream is not this one's.
    let mut users =
        Subscription::open(&client, &format!("{gateway}/v1/streams/users?from=earliest"), &admin.access_token, None)
            .await;
    let registered = users.event(Duration::from_secs(10)).await;
    assert_eq!(registered["event_type"], "UserRegistered");
    // Personal data is sealed in the log and redacted in streams.
    assert_eq!(registered["payload"]["email"], "[redacted]", "{registered}");
    assert_eq!(registered["payload"]["display_name"], "[redacted]", "{registered}");
    let users_cursor = users.parser.last_id.clone().unwrap();
    let wrong = Subscription::request(
        &client,
        &format!("{gateway}/v1/streams/posts"),
        &admin.access_token,
        Some(&users_cursor),
    )
    .await;
    assert_eq!(wrong.status(), StatusCode::BAD_REQUEST);
    drop(users);

    // The author watches their own draft; the admin watches publications only.
    let draft = command("/v1/posts".into(), json!({"title": "Streams", "body": "Draft."})).await;
    let mine = format!("{gateway}/v1/streams/posts/{draft}?from=earliest");
    // The stream of an aggregate needs its owner, from the read model.
    let mut own =
        Subscription::open_when_allowed(&client, &mine, &author.access_token, "the draft in the read model").await;
    let mut published = Subscription::open(
        &client,
        &format!("{gateway}/v1/streams/posts?type=PostPublished"),
        &admin.access_token,
        None,
    )
    .await;
    let other = command("/v1/posts".into(), json!({"title": "Other"})).await;
    command(format!("/v1/posts/{other}/publish"), json!({})).await;
    command(format!("/v1/posts/{draft}/publish"), json!({})).await;
    let drafted = own.event(Duration::from_secs(10)).await;
    assert_eq!((drafted["event_type"].as_str(), drafted["aggregate_version"].as_i64()), (Some("PostDrafted"), Some(1)));
    let own_published = own.event(Duration::from_secs(10)).await;
    assert_eq!(own_published["event_type"], "PostPublished");
    assert_eq!(own_published["aggregate_id"], draft.as_str());
    let mut publications = HashSet::new();
    for _ in 0..2 {
        let event = published.event(Duration::from_secs(10)).await;
        assert_eq!(event["event_type"], "PostPublished");
        publications.insert(event["aggregate_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(publications, HashSet::from([draft.clone(), other.clone()]));
    // Heartbeats keep the idle stream open.
    assert!(published.next(Duration::from_millis(2500)).await.is_none());
    assert!(published.parser.comments >= 1, "no heartbeat on an idle stream");

    // From a time: what was stamped from then on, and nothing before.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let since = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let later = command("/v1/posts".into(), json!({"title": "Later"})).await;
    let from = since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut timed = Subscription::open(
        &client,
        &format!("{gateway}/v1/streams/posts?from={}", from.replace('+', "%2B")),
        &admin.access_token,
        None,
    )
    .await;
    let first = timed.event(Duration::from_secs(10)).await;
    assert_eq!(
        (first["aggregate_id"].as_str(), first["event_type"].as_str()),
        (Some(later.as_str()), Some("PostDrafted"))
    );
    drop(timed);

    // `keel tail` prints the same stream, as JSON lines, and stops after --limit.
    let output = platform
        .keel(&["tail", "posts", "--from", "earliest", "--format", "json", "--limit", "5", "--gateway", &gateway])
        .env("KEEL_TOKEN", &admin.access_token)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    let kinds: Vec<&str> = lines.iter().map(|line| line["event_type"].as_str().unwrap()).collect();
    assert!(kinds.iter().all(|kind| ["PostDrafted", "PostPublished"].contains(kind)), "{kinds:?}");
    let pretty = platform
        .keel(&[
            "tail",
            "posts",
            &draft,
            "--from",
            "earliest",
            "--limit",
            "2",
            "--gateway",
            &gateway,
            "--token",
            &author.access_token,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(pretty.stdout).unwrap();
    assert!(pretty.status.success() && text.contains("PostDrafted") && text.contains("PostPublished"), "{text}");
    let refused =
        platform.keel(&["tail", "audit", "--gateway", &gateway, "--token", &author.access_token]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("403"), "{}", String::from_utf8_lossy(&refused.stderr));

    // A client that takes nothing loses its stream after the stall timeout, and its place; what
    // it gets once it reads again ends without a final event, and resumes from its last id.
    // (More than the socket buffers hold: about 9 MB.)
    let body = "z".repeat(60_000);
    let drafted = draft_posts(&client, &gateway, &author, 150, &body).await;
    // Open now: the author's own stream and the admin's publications (the others were dropped,
    // and are let go as the drafts reach them).
    eventually(Duration::from_secs(30), "the dropped streams to be let go", || async {
        (platform.metric(Role::Gateway, "keel_streams_open").await == Some(2.0)).then_some(())
    })
    .await;
    let stalled = stalled_client(&gateway, "/v1/streams/posts?from=earliest", &admin.access_token).await;
    eventually(Duration::from_secs(30), "the stalled stream to be dropped", || async {
        let stalled = platform.metric(Role::Gateway, "keel_stream_stalled_total").await;
        let open = platform.metric(Role::Gateway, "keel_streams_open").await;
        (stalled == Some(1.0) && open == Some(2.0)).then_some(())
    })
    .await;
    let (_, body) = read_chunked(stalled).await;
    let mut parser = SseParser::default();
    let got = parser.push(&body);
    assert!(got.iter().all(|event| event.event == "message"), "no final event for a stalled client");
    assert!(!got.is_empty() && got.len() < drafted.len(), "{} events before the stall", got.len());
    let resumed = Subscription::open(
        &client,
        &format!("{gateway}/v1/streams/posts"),
        &admin.access_token,
        parser.last_id.as_deref(),
    )
    .await;
    drop(resumed);

    // Losing the permission a stream needs ends it, with where to resume.
    let watcher = platform.signup(&client, "watcher@example.com", "Wanda Watcher").await;
    let as_admin = |request: reqwest::RequestBuilder| request.bearer_auth(&admin.access_token).send();
    let role = as_admin(client.post(format!("{gateway}/v1/roles")).json(&json!({
        "name": "watcher", "permissions": ["streams:read:any"]
    })))
    .await
    .unwrap();
    assert_eq!(role.status(), StatusCode::CREATED);
    let grant =
        as_admin(client.post(format!("{gateway}/v1/users/{}/roles", watcher.id)).json(&json!({"role": "watcher"})))
            .await
            .unwrap();
    assert!(grant.status().is_success(), "{}", grant.status());
    let comments = format!("{gateway}/v1/streams/comments");
    let mut watching =
        Subscription::open_when_allowed(&client, &comments, &watcher.access_token, "the grant to be in force").await;
    let revoke = as_admin(client.delete(format!("{gateway}/v1/users/{}/roles/watcher", watcher.id))).await.unwrap();
    assert!(revoke.status().is_success(), "{}", revoke.status());
    let ended = watching.next(Duration::from_secs(20)).await.expect("a final event");
    assert_eq!(ended.event, "end");
    assert!(ended.data.contains("no longer watch"), "{ended:?}");
    assert!(ended.id.is_some(), "{ended:?}");
    let refused = Subscription::request(&client, &comments, &watcher.access_token, None).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // Logging out ends the author's stream; shutting the gateway down ends the admin's, each
    // with a final event to resume from.
    let logout =
        client.post(format!("{gateway}/v1/auth/logout")).bearer_auth(&author.access_token).send().await.unwrap();
    assert!(logout.status().is_success());
    let ended = own.next(Duration::from_secs(20)).await.expect("a final event");
    assert_eq!(ended.event, "end");
    assert!(ended.data.contains("the session ended"), "{ended:?}");
    let status = platform.terminate(Role::Gateway, Duration::from_secs(15));
    assert!(status.success(), "{status}");
    let last = loop {
        let event = published.next(Duration::from_secs(10)).await.expect("a final event at shutdown");
        if event.event != "message" {
            break event;
        }
    };
    assert_eq!(last.event, "end");
    let resume = serde_json::from_str::<Value>(&last.data).unwrap()["resume"].as_str().unwrap().to_owned();
    assert_eq!(last.id.as_deref(), Some(resume.as_str()));
}
