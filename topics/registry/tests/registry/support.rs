//! The test harness: the real registry router, in-process on port 0, over a fresh database.

use std::future::Future;
use std::net::SocketAddr;

use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

/// The server to create test databases on (its `postgres` maintenance database).
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// What a test gets: the registry's base URL and an HTTP client.
#[derive(Clone)]
pub struct Registry {
    pub url: String,
    http: reqwest::Client,
}

/// An HTTP answer: status, content type and JSON body (`Value::Null` if it was not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
}

impl Answer {
    /// The Confluent `error_code` of an error answer.
    pub fn error_code(&self) -> i64 {
        self.body["error_code"].as_i64().unwrap_or_default()
    }
}

/// Runs `test` against a registry on a fresh database, then drops the database (also when the
/// test panics, whose panic is then resumed).
pub async fn with_registry<F, Fut>(test: F)
where
    F: FnOnce(Registry) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let admin_url = std::env::var("KEEL_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
    let database = format!("keel_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url).await.expect("connect to the test PostgreSQL server");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{database}\"")))
        .execute(&mut admin)
        .await
        .expect("create the test database");

    let options: PgConnectOptions = admin_url.parse().expect("admin url parses");
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(options.database(&database))
        .await
        .expect("connect to the test database");
    sqlx::migrate!("../../migrations").run(&pool).await.expect("migrations apply");

    let (address, server) = serve(pool.clone()).await;
    let registry = Registry { url: format!("http://{address}"), http: reqwest::Client::new() };
    let outcome = tokio::spawn(test(registry)).await;

    server.abort();
    pool.close().await;
    let dropped = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")))
        .execute(&mut admin)
        .await;
    if let Err(error) = dropped {
        eprintln!("could not drop test database {database}: {error}");
    }
    if let Err(error) = outcome
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
}

async fn serve(pool: PgPool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let address = listener.local_addr().expect("local address");
    let app = keel_registry::router(keel_registry::PgSchemaStore::new(pool));
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("registry serves");
    });
    (address, server)
}

impl Registry {
    pub async fn get(&self, path: &str) -> Answer {
        self.send(self.http.get(self.at(path))).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.send(self.http.delete(self.at(path))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.post_raw(path, &body.to_string(), "application/vnd.schemaregistry.v1+json").await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Answer {
        let request = self
            .http
            .put(self.at(path))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(body.to_string());
        self.send(request).await
    }

    pub async fn post_raw(&self, path: &str, body: &str, content_type: &str) -> Answer {
        let request = self.http.post(self.at(path)).header("content-type", content_type).body(body.to_owned());
        self.send(request).await
    }

    /// Registers `schema` (Avro JSON text) under `subject`.
    pub async fn register(&self, subject: &str, schema: &str) -> Answer {
        self.post(&format!("/subjects/{subject}/versions"), &json!({ "schema": schema })).await
    }

    /// Registers and returns the id, failing the test unless it succeeded.
    pub async fn register_ok(&self, subject: &str, schema: &str) -> i64 {
        let answer = self.register(subject, schema).await;
        assert_eq!(answer.status, 200, "register {subject}: {answer:?}");
        answer.body["id"].as_i64().expect("id in the answer")
    }

    /// The versions of `subject`, failing the test unless the subject exists.
    pub async fn versions(&self, subject: &str) -> Vec<i64> {
        let answer = self.get(&format!("/subjects/{subject}/versions")).await;
        assert_eq!(answer.status, 200, "versions of {subject}: {answer:?}");
        answer
            .body
            .as_array()
            .expect("a list of versions")
            .iter()
            .map(|v| v.as_i64().expect("a version number"))
            .collect()
    }

    pub async fn set_level(&self, subject: &str, level: &str) {
        let answer = self.put(&format!("/config/{subject}"), &json!({ "compatibility": level })).await;
        assert_eq!(answer.status, 200, "set level: {answer:?}");
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("the registry answers");
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let text = response.text().await.expect("a body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, content_type, body }
    }
}

/// A record schema named `name` with `fields` (a JSON array text).
pub fn record(name: &str, fields: &str) -> String {
    format!(r#"{{"type":"record","name":"{name}","namespace":"keel.test","fields":{fields}}}"#)
}
