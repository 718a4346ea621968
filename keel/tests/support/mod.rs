//! The real platform for end-to-end tests: a nisshi broker (memory storage, random port), a fresh
//! PostgreSQL database, a prefix of its own in etcd (the service registry), and every Keel role as
//! its own `keel` process.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};
use sqlx::{Connection, PgConnection, PgPool};

pub const TOPIC_PARTITIONS: i32 = 8;

/// A TCP port reserved for this test process on loopback, below the ephemeral range (Linux:
/// 32768 and up), so no outgoing connection takes it. The reservation is a lock on a file that
/// every Keel test process honours, held until the `Port` drops (or the process dies): no other
/// test binds the port meanwhile, however many run at once, and a server killed and started
/// again finds it still free.
///
/// Keel's own roles never bind their ports: [`Platform`] binds each one and hands the socket
/// over (see `keel_runtime::listen`). Servers that cannot take a socket (the broker, PostgreSQL,
/// Redis, etcd) bind the reserved port themselves.
#[derive(Debug)]
pub struct Port {
    pub number: u16,
    _reservation: File,
}

pub fn reserve_port() -> Port {
    let dir = std::env::temp_dir().join("keel-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    loop {
        let number = 20_000 + (uuid::Uuid::new_v4().as_u128() % 12_000) as u16;
        let reservation =
            OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(number.to_string()));
        let Ok(reservation) = reservation else { continue };
        // Held by another test process; or bound by something that is not a Keel test.
        if reservation.try_lock().is_err() || TcpListener::bind(("127.0.0.1", number)).is_err() {
            continue;
        }
        return Port { number, _reservation: reservation };
    }
}

/// One of the at most `KEEL_TEST_PLATFORMS` (default 2) platforms that run at once on this
/// machine, across test processes: each starts a broker and up to a dozen roles, and two cores
/// run no more than that well. Held by the platform until it drops.
struct PlatformSlot(#[allow(dead_code)] File);

impl PlatformSlot {
    async fn acquire() -> Self {
        let slots: usize = std::env::var("KEEL_TEST_PLATFORMS").ok().and_then(|n| n.parse().ok()).unwrap_or(2);
        let dir = std::env::temp_dir().join("keel-test-platforms");
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<File> = (0..slots.max(1))
            .map(|slot| {
                OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(slot.to_string())).unwrap()
            })
            .collect();
        loop {
            for file in &files {
                if file.try_lock().is_ok() {
                    return Self(file.try_clone().unwrap());
                }
            }
            // A slot frees when another test's platform drops: nothing to be told by.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn log_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("keel-tests").join(uuid::Uuid::new_v4().simple().to_string());
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn append_log(path: &Path) -> File {
    OpenOptions::new().create(true).append(true).open(path).unwrap()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The nisshi binary: on PATH, or where `cargo install` puts it.
fn nisshi_binary() -> PathBuf {
    if let Ok(path) = std::env::var("NISSHI_BIN") {
        return PathBuf::from(path);
    }
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let installed = cargo_home.join("bin").join("nisshi");
    if installed.exists() { installed } else { PathBuf::from("nisshi") }
}

/// A Kafka-API broker on loopback, stopped on drop.
pub struct Broker {
    child: Option<Child>,
    pub bootstrap: String,
    log: PathBuf,
    dir: PathBuf,
    port: Port,
    /// nisshi's storage engine: memory, or a PostgreSQL database (durable across restarts).
    storage: String,
}

impl Broker {
    /// A broker keeping everything in memory.
    pub fn start(dir: &Path) -> Self {
        Self::start_on(dir, "memory://nisshi/".to_owned())
    }

    /// A broker storing in `storage` (`memory://…` or a `postgres://…?sslmode=disable` URL).
    pub fn start_on(dir: &Path, storage: String) -> Self {
        let port = reserve_port();
        let log = dir.join("nisshi.log");
        let bootstrap = format!("127.0.0.1:{}", port.number);
        let mut broker = Self { child: None, bootstrap, log, dir: dir.to_owned(), port, storage };
        broker.run();
        broker
    }

    fn run(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port.number);
        let child = Command::new(nisshi_binary())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine"])
            .arg(&self.storage)
            // nisshi reads a `.env` file from its working directory: the test's own.
            .current_dir(&self.dir)
            .stdout(append_log(&self.log))
            .stderr(append_log(&self.log))
            .spawn()
            .expect("nisshi is installed (scripts/infra ensure)");
        self.child = Some(child);
        self.wait_until_serving();
    }

    /// SIGKILL, then the same broker again on the same address and storage.
    pub fn kill9_and_restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        self.run();
    }

    fn wait_until_serving(&self) {
        let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.fetch_metadata(None, Duration::from_secs(1)).is_err() {
            assert!(Instant::now() < deadline, "nisshi did not start:\n{}", tail(&self.log, 30));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sum of the high watermarks of an event topic: how many records were ever appended to it.
    pub fn record_count(&self, topic: &str) -> i64 {
        self.record_count_in(topic, TOPIC_PARTITIONS)
    }

    /// Whether any record of an event topic holds `needle` in its key, value or headers.
    pub fn topic_contains(&self, topic: &str, needle: &[u8]) -> bool {
        use rdkafka::{
            Offset, TopicPartitionList,
            message::{Headers, Message},
        };
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", "keel-test-scan")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut remaining = 0;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..TOPIC_PARTITIONS {
            let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)).unwrap();
            remaining += high;
            assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let contains = |haystack: &[u8]| haystack.windows(needle.len()).any(|window| window == needle);
        let deadline = Instant::now() + Duration::from_secs(30);
        while remaining > 0 {
            assert!(Instant::now() < deadline, "could not read {topic} to its end");
            let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
            let message = message.unwrap();
            remaining -= 1;
            let in_headers = message.headers().is_some_and(|headers| {
                headers.iter().any(|header| contains(header.key.as_bytes()) || header.value.is_some_and(contains))
            });
            if message.key().is_some_and(contains) || message.payload().is_some_and(contains) || in_headers {
                return true;
            }
        }
        false
    }

    /// Sum of the high watermarks of a topic with `partitions` partitions.
    pub fn record_count_in(&self, topic: &str, partitions: i32) -> i64 {
        let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().unwrap();
        (0..partitions)
            .map(|partition| client.fetch_watermarks(topic, partition, Duration::from_secs(5)).unwrap().1)
            .sum()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A database of its own for one test, dropped with it.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin_url = std::env::var("KEEL_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        Self::create_on(admin_url).await
    }

    /// A database on the server `admin_url` names (its `postgres` database).
    pub async fn create_on(admin_url: String) -> Self {
        let name = format!("keel_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url).await.expect("PostgreSQL runs (scripts/infra ensure)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
        let base = admin_url.rsplit_once('/').unwrap().0;
        Self { url: format!("{base}/{name}"), name, admin_url }
    }

    pub async fn pool(&self) -> PgPool {
        PgPool::connect(&self.url).await.unwrap()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Best effort, outside the test's runtime: a leftover database only costs disk.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join()
        .ok();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Registry,
    Identity,
    Auth,
    Authz,
    Blog,
    Projector,
    Gateway,
    /// A second projector instance, with its own admin address.
    SecondProjector,
    /// A second identity instance, with its own gRPC and admin addresses.
    SecondIdentity,
    /// A second gateway, with its own listen address.
    SecondGateway,
    /// More command service instances, each with its own gRPC and admin addresses.
    ThirdIdentity,
    SecondAuth,
    SecondAuthz,
    SecondBlog,
}

impl Role {
    pub fn command(self) -> &'static str {
        match self {
            Self::Registry => "registry",
            Self::Identity | Self::SecondIdentity | Self::ThirdIdentity => "identity",
            Self::Auth | Self::SecondAuth => "auth",
            Self::Authz | Self::SecondAuthz => "authz",
            Self::Blog | Self::SecondBlog => "blog",
            Self::Projector | Self::SecondProjector => "projector",
            Self::Gateway | Self::SecondGateway => "gateway",
        }
    }
}

/// Every role a full platform runs, in start order.
pub const ALL_ROLES: &[Role] = &[
    Role::Registry,
    Role::Identity,
    Role::SecondIdentity,
    Role::Auth,
    Role::Authz,
    Role::Blog,
    Role::Projector,
    Role::Gateway,
];

/// What the identity write path needs to register users and the gateway to check tokens.
pub const IDENTITY_ROLES: &[Role] =
    &[Role::Registry, Role::Identity, Role::SecondIdentity, Role::Auth, Role::Authz, Role::Projector, Role::Gateway];

/// The email the platform makes an admin (`authz.bootstrap_admins`).
pub const ADMIN_EMAIL: &str = "admin@keel.test";
/// `auth.key_encryption_key` of the test platforms, so tests can read the signing keys.
pub const KEY_ENCRYPTION_KEY: &str = "dGVzdC1rZXktZW5jcnlwdGlvbi1rZXktMzItYnl0ZXM=";
/// `personal_data.master_key` of the test platforms.
pub const MASTER_KEY: &str = "dGVzdC1wZXJzb25hbC1kYXRhLW1hc3Rlci1rZXktMzI=";
/// The password of every account the tests make.
pub const PASSWORD: &str = "correct horse battery staple";

struct Running {
    child: Child,
    admin_url: String,
    log: PathBuf,
}

/// Every role running as its own process against one broker and one database.
pub struct Platform {
    pub dir: PathBuf,
    pub broker: Broker,
    pub database: TestDatabase,
    pub gateway_url: String,
    env: Vec<(String, String)>,
    admin_urls: BTreeMap<Role, String>,
    /// Per second instance, the environment that sets it apart from the first.
    overrides: BTreeMap<Role, Vec<(String, String)>>,
    running: BTreeMap<Role, Running>,
    /// The ports of every role's listeners, bound anew each time the role starts.
    ports: Vec<Port>,
    /// Held for the platform's life: one of the platforms the machine runs at once.
    slot: PlatformSlot,
}

impl Platform {
    /// Broker, database, migrations, topics, then every role ([`ALL_ROLES`]).
    pub async fn start() -> Self {
        Self::start_roles(ALL_ROLES).await
    }

    /// Broker, database, migrations, topics, then `roles`: the registry first (the others register
    /// their schemas with it as they start), then the rest together.
    pub async fn start_roles(roles: &[Role]) -> Self {
        Self::start_roles_with(roles, Role::Registry, &[]).await
    }

    /// [`Self::start_roles`], with `special` started with the environment `extra` besides its own.
    pub async fn start_roles_with(roles: &[Role], special: Role, extra: &[(&str, &str)]) -> Self {
        let mut platform = Self::prepare().await;
        platform.start_in_order(roles, special, extra).await;
        platform
    }

    /// [`Self::start_roles`] on the servers `setup` names.
    pub async fn start_with(setup: Setup, roles: &[Role]) -> Self {
        let mut platform = Self::prepare_with(setup).await;
        platform.start_in_order(roles, Role::Registry, &[]).await;
        platform
    }

    async fn start_in_order(&mut self, roles: &[Role], special: Role, extra: &[(&str, &str)]) {
        let platform = self;
        let (first, rest): (Vec<Role>, Vec<Role>) = roles.iter().partition(|role| **role == Role::Registry);
        for group in [first, rest] {
            for role in &group {
                if *role == special {
                    platform.spawn_with(*role, extra);
                } else {
                    platform.spawn(*role);
                }
            }
            for role in &group {
                platform.wait_ready(*role, Duration::from_secs(90)).await;
            }
        }
    }

    /// Broker, database, migrations and topics; no role runs yet.
    pub async fn prepare() -> Self {
        Self::prepare_with(Setup::default()).await
    }

    /// [`Self::prepare`] on servers of the test's own where `setup` names them.
    pub async fn prepare_with(setup: Setup) -> Self {
        let slot = PlatformSlot::acquire().await;
        let dir = setup.dir.unwrap_or_else(log_dir);
        let broker = match setup.broker_storage {
            Some(storage) => Broker::start_on(&dir, storage),
            None => Broker::start(&dir),
        };
        let database = match setup.postgres_admin_url {
            Some(admin_url) => TestDatabase::create_on(admin_url).await,
            None => TestDatabase::create().await,
        };
        let etcd = setup.etcd_url.unwrap_or_else(shared_etcd_url);
        // Every address a role of this platform may listen on, reserved for the platform's life.
        let listen_keys = [
            "KEEL_REGISTRY__LISTEN",
            "KEEL_IDENTITY__GRPC_LISTEN",
            "KEEL_IDENTITY__ADMIN_LISTEN",
            "KEEL_AUTH__GRPC_LISTEN",
            "KEEL_AUTH__ADMIN_LISTEN",
            "KEEL_AUTHZ__GRPC_LISTEN",
            "KEEL_AUTHZ__ADMIN_LISTEN",
            "KEEL_BLOG__GRPC_LISTEN",
            "KEEL_BLOG__ADMIN_LISTEN",
            "KEEL_PROJECTOR__ADMIN_LISTEN",
            "KEEL_GATEWAY__LISTEN",
            "SECOND_PROJECTOR_ADMIN_LISTEN",
            "SECOND_IDENTITY_GRPC_LISTEN",
            "SECOND_IDENTITY_ADMIN_LISTEN",
            "SECOND_GATEWAY_LISTEN",
            "THIRD_IDENTITY_GRPC_LISTEN",
            "THIRD_IDENTITY_ADMIN_LISTEN",
            "SECOND_AUTH_GRPC_LISTEN",
            "SECOND_AUTH_ADMIN_LISTEN",
            "SECOND_AUTHZ_GRPC_LISTEN",
            "SECOND_AUTHZ_ADMIN_LISTEN",
            "SECOND_BLOG_GRPC_LISTEN",
            "SECOND_BLOG_ADMIN_LISTEN",
        ];
        let ports: Vec<Port> = listen_keys.iter().map(|_| reserve_port()).collect();
        let mut env: Vec<(String, String)> = listen_keys
            .iter()
            .zip(&ports)
            .map(|(key, port)| ((*key).to_owned(), format!("127.0.0.1:{}", port.number)))
            .collect();
        let registry = env[0].1.clone();
        env.extend(
            [
                ("KEEL_DATABASE__URL", database.url.clone()),
                ("KEEL_KAFKA__BOOTSTRAP_SERVERS", broker.bootstrap.clone()),
                ("KEEL_SCHEMA_REGISTRY__URL", format!("http://{registry}")),
                // Every role registers in etcd and finds the others there, under a prefix of this
                // platform's own.
                ("KEEL_DISCOVERY__BACKEND", "etcd".to_owned()),
                ("KEEL_DISCOVERY__ETCD__ENDPOINTS", etcd),
                (
                    "KEEL_GATEWAY__RATE_LIMIT__REDIS_URL",
                    setup.redis_url.unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned()),
                ),
                ("KEEL_DISCOVERY__ETCD__PREFIX", format!("/keel-test/{}", uuid::Uuid::new_v4().simple())),
                ("KEEL_LOG__FORMAT", "json".to_owned()),
                ("KEEL_SHUTDOWN__GRACE_PERIOD_MS", "10000".to_owned()),
                // Every role of every platform a test binary runs at once shares one PostgreSQL
                // server (100 connections by default).
                ("KEEL_DATABASE__MAX_CONNECTIONS", "4".to_owned()),
                // Cheap hashes: thousands of registrations would otherwise cost minutes of CPU.
                ("KEEL_AUTH__ARGON2__MEMORY_KIB", "256".to_owned()),
                ("KEEL_AUTH__ARGON2__ITERATIONS", "1".to_owned()),
                ("KEEL_AUTHZ__BOOTSTRAP_ADMINS", ADMIN_EMAIL.to_owned()),
                ("KEEL_AUTH__KEY_ENCRYPTION_KEY", KEY_ENCRYPTION_KEY.to_owned()),
                ("KEEL_PERSONAL_DATA__MASTER_KEY", MASTER_KEY.to_owned()),
                ("KEEL_IDENTITY__EMAIL_KEY", "keel-test-email-key".to_owned()),
                // Limits far above what a test sends (the shared Redis, each test under its own
                // keys); the rate limit tests set their own.
                ("KEEL_GATEWAY__RATE_LIMIT__KEY_PREFIX", format!("keel-test:{}:", uuid::Uuid::new_v4().simple())),
                ("KEEL_GATEWAY__RATE_LIMIT__PER_IP", r#"{"per_second": 100000, "burst": 100000}"#.to_owned()),
                ("KEEL_GATEWAY__RATE_LIMIT__PER_USER", r#"{"per_second": 100000, "burst": 100000}"#.to_owned()),
                ("KEEL_GATEWAY__RATE_LIMIT__LOGIN_PER_IP", r#"{"per_second": 100000, "burst": 100000}"#.to_owned()),
                ("KEEL_GATEWAY__RATE_LIMIT__LOGIN_PER_ACCOUNT", r#"{"per_second": 1000, "burst": 1000}"#.to_owned()),
            ]
            .map(|(key, value)| (key.to_owned(), value)),
        );
        env.extend(setup.env);
        let address = |key: &str| env.iter().find(|(k, _)| k == key).unwrap().1.clone();
        let admin_urls = BTreeMap::from([
            (Role::Registry, format!("http://{}", address("KEEL_REGISTRY__LISTEN"))),
            (Role::Identity, format!("http://{}", address("KEEL_IDENTITY__ADMIN_LISTEN"))),
            (Role::Auth, format!("http://{}", address("KEEL_AUTH__ADMIN_LISTEN"))),
            (Role::Authz, format!("http://{}", address("KEEL_AUTHZ__ADMIN_LISTEN"))),
            (Role::Blog, format!("http://{}", address("KEEL_BLOG__ADMIN_LISTEN"))),
            (Role::Projector, format!("http://{}", address("KEEL_PROJECTOR__ADMIN_LISTEN"))),
            (Role::Gateway, format!("http://{}", address("KEEL_GATEWAY__LISTEN"))),
            (Role::SecondProjector, format!("http://{}", address("SECOND_PROJECTOR_ADMIN_LISTEN"))),
            (Role::SecondIdentity, format!("http://{}", address("SECOND_IDENTITY_ADMIN_LISTEN"))),
            (Role::SecondGateway, format!("http://{}", address("SECOND_GATEWAY_LISTEN"))),
            (Role::ThirdIdentity, format!("http://{}", address("THIRD_IDENTITY_ADMIN_LISTEN"))),
            (Role::SecondAuth, format!("http://{}", address("SECOND_AUTH_ADMIN_LISTEN"))),
            (Role::SecondAuthz, format!("http://{}", address("SECOND_AUTHZ_ADMIN_LISTEN"))),
            (Role::SecondBlog, format!("http://{}", address("SECOND_BLOG_ADMIN_LISTEN"))),
        ]);
        let instance = |section: &str, prefix: &str| {
            vec![
                (format!("KEEL_{section}__GRPC_LISTEN"), address(&format!("{prefix}_GRPC_LISTEN"))),
                (format!("KEEL_{section}__ADMIN_LISTEN"), address(&format!("{prefix}_ADMIN_LISTEN"))),
            ]
        };
        let overrides = BTreeMap::from([
            (
                Role::SecondProjector,
                vec![("KEEL_PROJECTOR__ADMIN_LISTEN".to_owned(), address("SECOND_PROJECTOR_ADMIN_LISTEN"))],
            ),
            (
                Role::SecondIdentity,
                vec![
                    ("KEEL_IDENTITY__GRPC_LISTEN".to_owned(), address("SECOND_IDENTITY_GRPC_LISTEN")),
                    ("KEEL_IDENTITY__ADMIN_LISTEN".to_owned(), address("SECOND_IDENTITY_ADMIN_LISTEN")),
                ],
            ),
            (Role::SecondGateway, vec![("KEEL_GATEWAY__LISTEN".to_owned(), address("SECOND_GATEWAY_LISTEN"))]),
            (Role::ThirdIdentity, instance("IDENTITY", "THIRD_IDENTITY")),
            (Role::SecondAuth, instance("AUTH", "SECOND_AUTH")),
            (Role::SecondAuthz, instance("AUTHZ", "SECOND_AUTHZ")),
            (Role::SecondBlog, instance("BLOG", "SECOND_BLOG")),
        ]);
        env.retain(|(key, _)| !key.starts_with("SECOND_") && !key.starts_with("THIRD_"));
        let gateway_url = admin_urls[&Role::Gateway].clone();
        let platform = Self {
            dir,
            broker,
            database,
            gateway_url,
            env,
            admin_urls,
            overrides,
            running: BTreeMap::new(),
            ports,
            slot,
        };
        for args in [&["migrate"][..], &["topics", "create"]] {
            let output = platform.keel(args).output().unwrap();
            assert!(output.status.success(), "keel {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        platform
    }

    /// A `keel` command with this platform's environment.
    pub fn keel(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    pub fn spawn(&mut self, role: Role) {
        self.spawn_with(role, &[]);
    }

    /// Starts a role with extra environment (overrides).
    /// Its listeners are bound here and handed over (`fd:NAME`), never bound by the role.
    pub fn spawn_with(&mut self, role: Role, extra: &[(&str, &str)]) {
        use command_fds::{CommandFdExt, FdMapping};

        let log = self.dir.join(format!("{role:?}.log").to_lowercase());
        let mut command = self.keel(&[role.command()]);
        let mut settings = self.overrides.get(&role).cloned().unwrap_or_default();
        settings.extend(extra.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())));
        let section = format!("KEEL_{}__", role.command().to_uppercase());
        let listeners: Vec<(String, std::net::SocketAddr)> = self
            .env
            .iter()
            .filter(|(key, _)| key.starts_with(&section) && key.ends_with("LISTEN"))
            .filter_map(|(key, value)| {
                let value = settings.iter().rev().find(|(name, _)| name == key).map_or(value, |(_, value)| value);
                Some((key.clone(), value.parse().ok()?))
            })
            .collect();
        let (mut mappings, mut names) = (Vec::new(), Vec::new());
        for (index, (key, address)) in listeners.into_iter().enumerate() {
            let listener = TcpListener::bind(address)
                .unwrap_or_else(|error| panic!("{role:?} cannot have {address} ({key}), its reserved port: {error}"));
            let name = key[section.len()..].to_lowercase();
            mappings.push(FdMapping { parent_fd: listener.into(), child_fd: 3 + index as i32 });
            settings.push((key, format!("fd:{name}")));
            names.push(name);
        }
        command.envs(settings).env("LISTEN_FDS", names.len().to_string()).env("LISTEN_FDNAMES", names.join(":"));
        command.fd_mappings(mappings).expect("one child fd per listener");
        command.stdin(Stdio::null()).stdout(append_log(&log)).stderr(append_log(&log));
        // The command holds the parent's copies of the sockets until it drops, right after: from
        // then on the role's process is the only holder, and a role killed refuses connections.
        let child = command.spawn().unwrap();
        let admin_url = self.admin_urls[&role].clone();
        self.running.insert(role, Running { child, admin_url, log });
    }

    pub async fn wait_ready(&mut self, role: Role, timeout: Duration) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running.get_mut(&role).unwrap();
            if let Some(status) = running.child.try_wait().unwrap() {
                panic!("{role:?} exited with {status} while starting:\n{}", tail(&running.log, 40));
            }
            let url = format!("{}/readyz", running.admin_url);
            if let Ok(response) = client.get(&url).send().await
                && response.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "{role:?} not ready in {timeout:?}:\n{}", tail(&running.log, 40));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no chance to drain or to clean up.
    pub fn kill9(&mut self, role: Role) {
        let mut running = self.running.remove(&role).expect("role is running");
        running.child.kill().unwrap();
        running.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn terminate(&mut self, role: Role, within: Duration) -> ExitStatus {
        let mut running = self.running.remove(&role).expect("role is running");
        let pid = running.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = running.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = running.child.kill();
                panic!("{role:?} did not exit within {within:?} of SIGTERM:\n{}", tail(&running.log, 40));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `keel ARGS` to completion, asserting success; returns its stdout.
    pub fn keel_ok(&self, args: &[&str]) -> String {
        let output = self.keel(args).output().unwrap();
        assert!(
            output.status.success(),
            "keel {args:?} exited with {}:\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Registers a user through the gateway (password [`PASSWORD`]); its id.
    pub async fn register(&self, client: &reqwest::Client, email: &str, display_name: &str) -> String {
        self.register_at(client, email, display_name).await.0
    }

    /// Registers a user; its id and the registration's consistency token.
    async fn register_at(&self, client: &reqwest::Client, email: &str, display_name: &str) -> (String, String) {
        let response = client
            .post(format!("{}/v1/users", self.gateway_url))
            .json(&serde_json::json!({"email": email, "display_name": display_name, "password": PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let token = response.headers()["keel-position"].to_str().unwrap().to_owned();
        let body: serde_json::Value = response.json().await.unwrap();
        (body["id"].as_str().unwrap().to_owned(), token)
    }

    /// Logs in; the account. `consistency`: a token the login waits for (a registration's).
    pub async fn login(&self, client: &reqwest::Client, email: &str, consistency: Option<&str>) -> Account {
        let mut request = client
            .post(format!("{}/v1/auth/login", self.gateway_url))
            .json(&serde_json::json!({"email": email, "password": PASSWORD}));
        if let Some(token) = consistency {
            request = request.header("keel-consistency", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "login of {email}: {}", response.text().await.unwrap());
        let body: serde_json::Value = response.json().await.unwrap();
        Account {
            id: body["user_id"].as_str().unwrap().to_owned(),
            access_token: body["access_token"].as_str().unwrap().to_owned(),
            refresh_token: body["refresh_token"].as_str().unwrap().to_owned(),
            session_id: body["session_id"].as_str().unwrap().to_owned(),
        }
    }

    /// Registers a user and logs them in. The login waits for the users projection to have the
    /// registration (at most `gateway.consistency_timeout_ms` at a time): a projector that just
    /// started may take longer, so a refused login is tried again for a while.
    pub async fn signup(&self, client: &reqwest::Client, email: &str, display_name: &str) -> Account {
        let (id, token) = self.register_at(client, email, display_name).await;
        let url = format!("{}/v1/auth/login", self.gateway_url);
        let body = serde_json::json!({"email": email, "password": PASSWORD});
        eventually(Duration::from_secs(60), "the registration to reach the users projection", || async {
            let response = client.post(&url).header("keel-consistency", &token).json(&body).send().await.unwrap();
            (response.status() == 200).then_some(())
        })
        .await;
        let account = self.login(client, email, None).await;
        assert_eq!(account.id, id);
        account
    }

    /// The bootstrap admin ([`ADMIN_EMAIL`]), signed up and logged in once its grant is in force.
    pub async fn admin(&self, client: &reqwest::Client) -> Account {
        let admin = self.signup(client, ADMIN_EMAIL, "Admin").await;
        let url = format!("{}/v1/roles", self.gateway_url);
        eventually(Duration::from_secs(30), "the bootstrap admin's grant", || async {
            let response = client.get(&url).bearer_auth(&admin.access_token).send().await.unwrap();
            (response.status() == 200).then_some(())
        })
        .await;
        admin
    }

    /// A setting of this platform's environment (`KEEL_IDENTITY__GRPC_LISTEN`, …).
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.env.iter().find(|(name, _)| name == key).map(|(_, value)| value.as_str())
    }

    /// The gRPC address (`host:port`) of a command service instance.
    pub fn grpc_address(&self, role: Role) -> String {
        let key = format!("KEEL_{}__GRPC_LISTEN", role.command().to_uppercase());
        let overridden =
            self.overrides.get(&role).and_then(|overrides| overrides.iter().find(|(name, _)| *name == key));
        overridden.map(|(_, value)| value.clone()).unwrap_or_else(|| self.setting(&key).unwrap().to_owned())
    }

    /// Whether `role` runs (was spawned, has not exited, and was not stopped by the test).
    pub fn is_running(&mut self, role: Role) -> bool {
        self.running.get_mut(&role).is_some_and(|running| running.child.try_wait().unwrap().is_none())
    }

    pub fn admin_url(&self, role: Role) -> &str {
        &self.admin_urls[&role]
    }

    pub fn log_tail(&self, role: Role) -> String {
        tail(&self.dir.join(format!("{role:?}.log").to_lowercase()), 40)
    }

    /// The sum of every sample of the metric `name` (whatever their labels) on a role's
    /// `/metrics`, if it has any.
    pub async fn metric_sum(&self, role: Role, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.admin_url(role))).await.ok()?.text().await.ok()?;
        let samples: Vec<f64> = text
            .lines()
            .filter(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse().ok())
            .collect();
        (!samples.is_empty()).then(|| samples.iter().sum())
    }

    /// The projector re-applied nothing and dead-lettered nothing: a checkpoint that moved outside
    /// its batch's transaction would bring back records the shared rule then skips as applied.
    /// The counters are present at 0 from the start, so a missing one fails.
    pub async fn assert_nothing_skipped_or_dead_lettered(&self) {
        for projection in ["users", "audit"] {
            let skipped = format!(r#"keel_projection_skipped_total{{projection="{projection}",reason="invalid"}}"#);
            assert_eq!(self.metric(Role::Projector, &skipped).await, Some(0.0), "{skipped}");
            let dead = format!(r#"keel_projection_dead_letters_total{{projection="{projection}"}}"#);
            assert_eq!(self.metric(Role::Projector, &dead).await, Some(0.0), "{dead}");
        }
        assert_eq!(self.keel_ok(&["projections", "dlq", "list"]).trim(), "", "no dead letter");
    }

    /// Waits until the live version of each of `projections` has applied every record the log
    /// holds (lag 0 at the projector's `/admin/projections`, measured against the broker's high
    /// watermarks). With nothing more being written, the read models then hold all they ever
    /// will, and exact counts can be taken.
    pub async fn caught_up(&self, projections: &[&str]) {
        let projector = [Role::Projector, Role::SecondProjector]
            .into_iter()
            .find(|role| self.running.contains_key(role))
            .expect("a projector runs");
        let url = format!("{}/admin/projections", self.admin_url(projector));
        eventually(Duration::from_secs(90), &format!("{projections:?} to apply the whole log"), || async {
            let status: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
            let applied = projections.iter().all(|name| {
                let versions = status.as_array().into_iter().flatten().filter(|projection| projection["name"] == *name);
                let live: Vec<&serde_json::Value> = versions
                    .flat_map(|projection| projection["versions"].as_array().into_iter().flatten())
                    .filter(|version| version["state"] == "live")
                    .collect();
                !live.is_empty() && live.iter().all(|version| version["lag"] == 0)
            });
            applied.then_some(())
        })
        .await;
    }

    /// The value of a metric sample (`name{labels}`) on a role's `/metrics`, if present.
    pub async fn metric(&self, role: Role, sample: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.admin_url(role))).await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("platform logs in {}", self.dir.display());
            for role in self.running.keys() {
                eprintln!("--- {role:?} ---\n{}", self.log_tail(*role));
            }
        }
        for running in self.running.values_mut() {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }
}

/// Where a platform's servers are, when not the machine's shared ones.
#[derive(Debug, Default)]
pub struct Setup {
    /// The directory for logs (and the test's own servers' data).
    pub dir: Option<PathBuf>,
    /// The `postgres` database of a PostgreSQL server of the test's own.
    pub postgres_admin_url: Option<String>,
    /// An etcd of the test's own.
    pub etcd_url: Option<String>,
    /// The broker's storage engine (default: memory).
    pub broker_storage: Option<String>,
    /// The gateways' rate limit store (default: the machine's Redis).
    pub redis_url: Option<String>,
    /// More settings for every role (`KEEL_…` variables).
    pub env: Vec<(String, String)>,
}

/// A fresh directory for a test's logs and servers.
pub fn test_dir() -> PathBuf {
    log_dir()
}

/// The machine's etcd (`scripts/infra ensure` starts it), or `KEEL_TEST_ETCD_URL`.
fn shared_etcd_url() -> String {
    std::env::var("KEEL_TEST_ETCD_URL").unwrap_or_else(|_| "http://127.0.0.1:2379".to_owned())
}

/// An etcd server of the test's own (single member, loopback), stopped on drop.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: Port,
    peer_port: Port,
    log: PathBuf,
}

impl Etcd {
    pub fn start(dir: &Path) -> Self {
        let mut etcd = Self {
            child: None,
            dir: dir.join("etcd"),
            client_port: reserve_port(),
            peer_port: reserve_port(),
            log: dir.join("etcd.log"),
        };
        etcd.run();
        etcd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port.number)
    }

    fn run(&mut self) {
        let (client, peer) = (self.url(), format!("http://127.0.0.1:{}", self.peer_port.number));
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(append_log(&self.log))
            .stderr(append_log(&self.log))
            .spawn()
            .expect("etcd is installed (scripts/infra ensure)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.healthy() {
            assert!(Instant::now() < deadline, "etcd did not start:\n{}", tail(&self.log, 30));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn healthy(&self) -> bool {
        Command::new("etcdctl")
            .args(["--endpoints", &self.url(), "--dial-timeout", "1s", "endpoint", "health"])
            .env("ETCDCTL_API", "3")
            .output()
            .is_ok_and(|output| output.status.success())
    }

    /// SIGKILL: the registry is gone at once.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts it again on the same addresses; `forget`: with an empty data directory, as a
    /// registry that lost its state (every registration must be made again).
    pub fn restart(&mut self, forget: bool) {
        self.kill9();
        if forget {
            std::fs::remove_dir_all(&self.dir).unwrap();
        }
        self.run();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Redis server of the test's own (nothing kept on disk), stopped on drop.
pub struct OwnRedis {
    child: Option<Child>,
    port: Port,
    log: PathBuf,
}

impl OwnRedis {
    pub fn start(dir: &Path) -> Self {
        let mut redis = Self { child: None, port: reserve_port(), log: dir.join("redis.log") };
        redis.start_server();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port.number)
    }

    pub fn start_server(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.number.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(append_log(&self.log))
            .stderr(append_log(&self.log))
            .spawn()
            .expect("redis-server is installed (scripts/infra ensure)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cli(&["ping"]).trim() != "PONG" {
            assert!(Instant::now() < deadline, "redis did not start:\n{}", tail(&self.log, 20));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the store is gone at once.
    pub fn stop_server(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// What `redis-cli ARGS` prints against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli").args(["-p", &self.port.number.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// A PostgreSQL server of the test's own (its own data directory and port), stopped on drop.
/// Run as the `postgres` user when the test runs as root, since PostgreSQL refuses root.
pub struct OwnPostgres {
    dir: PathBuf,
    port: Port,
    bin: PathBuf,
    log: PathBuf,
}

impl OwnPostgres {
    pub fn start(dir: &Path) -> Self {
        let versions = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL is installed");
        let mut bins: Vec<PathBuf> = versions.filter_map(|entry| Some(entry.ok()?.path().join("bin"))).collect();
        bins.sort();
        let bin = bins.pop().expect("a PostgreSQL version");
        let server = Self { dir: dir.join("postgres"), port: reserve_port(), bin, log: dir.join("postgres.log") };
        std::fs::create_dir_all(&server.dir).unwrap();
        if Self::as_root() {
            assert!(Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir).status().unwrap().success());
        }
        let data = server.dir.to_str().unwrap().to_owned();
        server.run("initdb", &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"]);
        server.start_server();
        server
    }

    fn as_root() -> bool {
        Command::new("id").arg("-u").output().is_ok_and(|output| output.stdout == b"0\n")
    }

    fn run(&self, program: &str, args: &[&str]) {
        let binary = self.bin.join(program);
        let mut command = if Self::as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&binary);
            command
        } else {
            Command::new(&binary)
        };
        let output = command.args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port.number)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let data = self.dir.to_str().unwrap().to_owned();
        let options = format!("-p {} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", self.port.number);
        self.run("pg_ctl", &["-D", &data, "-o", &options, "-l", self.log.to_str().unwrap(), "-w", "start"]);
    }

    /// Stops the server (fast: open connections are cut).
    pub fn stop_server(&self) {
        let data = self.dir.to_str().unwrap().to_owned();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.to_str().unwrap_or_default().to_owned();
        let binary = self.bin.join("pg_ctl");
        let mut command = if Self::as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&binary);
            command
        } else {
            Command::new(&binary)
        };
        let _ = command.args(["-D", &data, "-m", "immediate", "-w", "stop"]).output();
    }
}

/// A signed-in user.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: String,
    pub access_token: String,
    pub refresh_token: String,
    pub session_id: String,
}

/// Registers a user the way a careful client does without idempotency keys: a `503` means the
/// outcome is unknown, so it retries; a `409` after a `503` means the first attempt landed.
pub async fn register_retrying(client: &reqwest::Client, url: &str, email: &str, display_name: &str) {
    let body = serde_json::json!({"email": email, "display_name": display_name, "password": PASSWORD});
    let mut unknown_outcome = false;
    for _ in 0..100 {
        let response = client.post(url).json(&body).send().await.unwrap();
        match response.status().as_u16() {
            201 => return,
            409 if unknown_outcome => return,
            503 | 504 => {
                unknown_outcome = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("registering {email}: {other} {}", response.text().await.unwrap()),
        }
    }
    panic!("registering {email}: still unavailable after 100 attempts");
}

/// A checksum of a users table (or view): equal checksums, equal rows.
pub async fn users_checksum(pool: &PgPool, table: &str) -> (i64, String) {
    let statement = format!(
        "SELECT count(*), md5(coalesce(string_agg(id::text || '|' || email || '|' || display_name || '|' || version, ',' ORDER BY id), ''))
         FROM {table}"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(statement)).fetch_one(pool).await.unwrap()
}

/// The audit entries of users' events (registrations also audit their password, on its own topic).
pub async fn audited_user_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE topic = 'identity.users'").fetch_one(pool).await.unwrap()
}

pub async fn count(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"))).fetch_one(pool).await.unwrap()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
