//! Layered, typed configuration: defaults → YAML file → `KEEL_…` environment → secret files.
//!
//! Environment keys nest with `__` (`KEEL_DATABASE__MAX_CONNECTIONS=20`). A variable whose name
//! ends in `_FILE` names a file whose content is the value (`KEEL_DATABASE__PASSWORD_FILE=/run/
//! secrets/pg`); those are applied last, as container orchestrators mount secrets that way.
//! Unknown keys are errors, with their full path, in every layer.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

/// Environment variables that steer loading and are not part of the tree.
const RESERVED: &[&str] = &["KEEL_CONFIG", "KEEL_LOG", "KEEL_TOKEN", "KEEL_TEST_POSTGRES_URL"];
const PREFIX: &str = "KEEL_";
const FILE_SUFFIX: &str = "_FILE";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid YAML: {source}")]
    Yaml { path: PathBuf, source: serde_norway::Error },
    #[error("failed to read secret file {path} (from {variable}): {source}")]
    ReadSecret { variable: String, path: PathBuf, source: std::io::Error },
    #[error("environment variable {variable}: {reason}")]
    Environment { variable: String, reason: String },
    #[error("invalid configuration at `{path}`: {reason}")]
    Invalid { path: String, reason: String },
}

/// The process edges configuration is read from, injectable so tests never touch the real
/// environment.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    pub file: Option<PathBuf>,
    pub environment: Vec<(String, String)>,
}

impl ConfigSources {
    /// The config file from `--config` (or `KEEL_CONFIG`) and the process environment.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        let environment: Vec<_> = std::env::vars().collect();
        let file = file.or_else(|| environment.iter().find(|(k, _)| k == "KEEL_CONFIG").map(|(_, v)| PathBuf::from(v)));
        Self { file, environment }
    }

    /// Loads `T`, starting from `T::default()`, and layering every source over it.
    pub fn load<T>(&self) -> Result<T, ConfigError>
    where
        T: DeserializeOwned + Serialize + Default,
    {
        let mut tree = serde_json::to_value(T::default())
            .map_err(|error| ConfigError::Invalid { path: String::new(), reason: error.to_string() })?;
        if let Some(path) = &self.file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile { path: path.clone(), source })?;
            let layer: Value =
                serde_norway::from_str(&text).map_err(|source| ConfigError::Yaml { path: path.clone(), source })?;
            if !layer.is_null() {
                merge(&mut tree, layer);
            }
        }
        let mut secret_files = Vec::new();
        for (variable, raw) in &self.environment {
            let Some(key) = variable.strip_prefix(PREFIX) else { continue };
            if RESERVED.contains(&variable.as_str()) {
                continue;
            }
            if let Some(key) = key.strip_suffix(FILE_SUFFIX) {
                secret_files.push((variable, key, raw));
                continue;
            }
            set_path(&mut tree, variable, key, raw.clone())?;
        }
        for (variable, key, path) in secret_files {
            let content = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadSecret {
                variable: variable.clone(),
                path: PathBuf::from(path),
                source,
            })?;
            let value = content.strip_suffix('\n').unwrap_or(&content).to_owned();
            set_path(&mut tree, variable, key, value)?;
        }
        serde_path_to_error::deserialize(tree).map_err(|error| ConfigError::Invalid {
            path: error.path().to_string(),
            reason: error.into_inner().to_string(),
        })
    }
}

/// Deep-merges `layer` into `base`: objects merge key by key, anything else replaces.
fn merge(base: &mut Value, layer: Value) {
    match (base, layer) {
        (Value::Object(base), Value::Object(layer)) => {
            for (key, value) in layer {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, layer) => *base = layer,
    }
}

/// Sets `KEY__NESTED` to `raw`, typed like the value it replaces so that `"20"` becomes a number
/// where the tree holds a number and stays a string where it holds a string.
fn set_path(tree: &mut Value, variable: &str, key: &str, raw: String) -> Result<(), ConfigError> {
    let segments: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
    if segments.iter().any(String::is_empty) {
        return Err(ConfigError::Environment { variable: variable.to_owned(), reason: "empty key segment".into() });
    }
    let mut node = tree;
    for segment in &segments[..segments.len() - 1] {
        let object = node.as_object_mut().ok_or_else(|| ConfigError::Environment {
            variable: variable.to_owned(),
            reason: format!("`{segment}` is not a section"),
        })?;
        node = object.entry(segment.clone()).or_insert_with(|| Value::Object(Map::new()));
    }
    let object = node.as_object_mut().ok_or_else(|| ConfigError::Environment {
        variable: variable.to_owned(),
        reason: "parent is not a section".into(),
    })?;
    let last = segments.last().expect("split yields at least one segment");
    let typed = match object.get(last) {
        // A list may also be written plainly, comma-separated: `a,b` for `["a", "b"]`.
        Some(Value::Array(_)) if !raw.trim_start().starts_with('[') => {
            Value::Array(raw.split(',').map(str::trim).filter(|item| !item.is_empty()).map(Value::from).collect())
        }
        Some(Value::Number(_) | Value::Bool(_) | Value::Array(_) | Value::Object(_)) => serde_json::from_str(&raw)
            .map_err(|error| ConfigError::Environment {
                variable: variable.to_owned(),
                reason: format!("cannot parse {raw:?}: {error}"),
            })?,
        _ => Value::String(raw),
    };
    object.insert(last.clone(), typed);
    Ok(())
}

/// A value that never appears in logs, debug output or `keel config dump`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive; `KEEL_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, filter: "info".into() }
    }
}

impl LogConfig {
    /// The filter must parse as the directive `tracing` will use.
    pub fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.filter).map(|_| ()).map_err(|error| ConfigError::Invalid {
            path: "log.filter".into(),
            reason: format!("not a tracing filter directive such as `info,keel=debug`: {error}"),
        })
    }
}

/// Where errors go besides the log and `keel_errors_total`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorsConfig {
    /// The DSN of a Sentry project (Sentry, or a tracker that speaks its protocol: Bugsink,
    /// GlitchTip). Unset: system errors are logged and counted only.
    pub sentry_dsn: Option<Secret>,
    /// The environment reports are filed under (`production`, `staging`, …).
    pub environment: String,
}

impl Default for ErrorsConfig {
    fn default() -> Self {
        Self { sentry_dsn: None, environment: "development".into() }
    }
}

impl ErrorsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ensure(!self.environment.trim().is_empty(), "errors.environment", "must not be empty")?;
        ensure(
            self.sentry_dsn.as_ref().is_none_or(|dsn| dsn.expose().parse::<sentry::types::Dsn>().is_ok()),
            "errors.sentry_dsn",
            "must be a Sentry DSN such as https://<key>@<host>/<project>",
        )
    }
}

/// Traces: how many are kept and where they go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The base URL of an OTLP/HTTP receiver (`http://collector:4318`; spans go to
    /// `/v1/traces`). Unset: trace context is still carried across every hop, nothing is sent.
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded (0 to 1); a trace begun elsewhere follows its caller's
    /// decision.
    pub sample_ratio: f64,
    /// Spans waiting for export at most; more are dropped (and the export tells how many).
    pub queue_size: usize,
    /// How often a batch is sent.
    pub export_every_ms: u64,
    /// Bound on one export (and on the flush at exit).
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            queue_size: 2048,
            export_every_ms: 1000,
            export_timeout_ms: 5000,
        }
    }
}

impl TracingConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ensure((0.0..=1.0).contains(&self.sample_ratio), "tracing.sample_ratio", "must be between 0 and 1")?;
        ensure(self.queue_size > 0, "tracing.queue_size", "must be positive")?;
        ensure(self.export_every_ms > 0, "tracing.export_every_ms", "must be positive")?;
        ensure(self.export_timeout_ms > 0, "tracing.export_timeout_ms", "must be positive")?;
        ensure(
            self.otlp_endpoint.as_ref().is_none_or(|endpoint| {
                endpoint.parse::<http::Uri>().is_ok_and(|uri| matches!(uri.scheme_str(), Some("http" | "https")))
            }),
            "tracing.otlp_endpoint",
            "must be an http(s) URL such as http://127.0.0.1:4318",
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight work may take to drain after SIGTERM before it is aborted.
    pub grace_period_ms: u64,
    /// After deregistering, how long a stopping role keeps serving before its servers stop
    /// accepting: the time its callers take to notice (etcd watchers: milliseconds; Kubernetes
    /// endpoints: seconds).
    pub drain_delay_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_period_ms: 10_000, drain_delay_ms: 500 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user@host:port/database`; put the password in `password`.
    pub url: String,
    pub password: Option<Secret>,
    /// The most connections the role's pool opens; unset: what the role needs (see the README's
    /// table of connections per role).
    #[serde(deserialize_with = "optional_number")]
    pub max_connections: Option<u32>,
    pub acquire_timeout_ms: u64,
    /// Run the embedded migrations when the role starts.
    pub migrate_on_start: bool,
    /// Where a role that listens for notifications (`LISTEN`) opens its one listening connection.
    /// Unset: `url`. Behind a transaction-mode pooler (PgBouncer), which cannot keep a session's
    /// `LISTEN`, point it at PostgreSQL itself.
    pub listen_url: Option<String>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/keel".into(),
            password: None,
            max_connections: None,
            acquire_timeout_ms: 5_000,
            migrate_on_start: true,
            listen_url: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// Extra librdkafka properties (`security.protocol`, `sasl.username`, …) for every client.
    pub properties: BTreeMap<String, String>,
    /// SASL password or other credential, passed as `sasl.password`.
    pub sasl_password: Option<Secret>,
    /// Prefix of every topic name, so several installations can share one cluster.
    pub topic_prefix: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            properties: BTreeMap::new(),
            sasl_password: None,
            topic_prefix: String::new(),
        }
    }
}

/// An optional number, also from an environment variable: a key whose default is unset gets the
/// variable's text, which is parsed here.
fn optional_number<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr + Deserialize<'de>,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw<T> {
        Number(T),
        Text(String),
    }
    match Option::<Raw<T>>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Raw::Number(number)) => Ok(Some(number)),
        Some(Raw::Text(text)) => text.trim().parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// Checks a config value; used by the roles' `validate` functions.
pub fn ensure(condition: bool, path: &str, reason: &str) -> Result<(), ConfigError> {
    if condition { Ok(()) } else { Err(ConfigError::Invalid { path: path.to_owned(), reason: reason.to_owned() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Tree {
        database: DatabaseConfig,
        kafka: KafkaConfig,
        endpoints: Vec<String>,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn layers_apply_in_order_file_then_environment_then_secret_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keel.yaml");
        std::fs::write(&file, "database:\n  url: postgres://file/db\n  max_connections: 3\n").unwrap();
        let secret = dir.path().join("pg-password");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let sources = ConfigSources {
            file: Some(file),
            environment: env(&[
                ("KEEL_DATABASE__MAX_CONNECTIONS", "20"),
                ("KEEL_DATABASE__PASSWORD", "from-env"),
                ("KEEL_DATABASE__PASSWORD_FILE", secret.to_str().unwrap()),
                ("KEEL_KAFKA__PROPERTIES__SASL.MECHANISM", "PLAIN"),
                ("PATH", "/usr/bin"),
            ]),
        };
        let tree: Tree = sources.load().unwrap();
        assert_eq!(tree.database.url, "postgres://file/db");
        assert_eq!(tree.database.max_connections, Some(20));
        assert_eq!(tree.database.password.unwrap().expose(), "s3cret");
        assert_eq!(tree.kafka.properties["sasl.mechanism"], "PLAIN");
        assert_eq!(tree.kafka.bootstrap_servers, "127.0.0.1:9092");
    }

    #[test]
    fn lists_come_from_the_environment_as_json_or_comma_separated() {
        for raw in ["http://a:1, http://b:2", r#"["http://a:1","http://b:2"]"#] {
            let sources = ConfigSources { file: None, environment: env(&[("KEEL_ENDPOINTS", raw)]) };
            assert_eq!(sources.load::<Tree>().unwrap().endpoints, ["http://a:1", "http://b:2"], "{raw}");
        }
    }

    #[test]
    fn unknown_keys_are_errors_with_their_path() {
        let sources = ConfigSources { file: None, environment: env(&[("KEEL_DATABASE__URLL", "x")]) };
        let error = sources.load::<Tree>().unwrap_err().to_string();
        assert!(error.contains("database") && error.contains("urll"), "{error}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keel.yaml");
        std::fs::write(&file, "kafkaa: {}\n").unwrap();
        let error = ConfigSources { file: Some(file), environment: vec![] }.load::<Tree>().unwrap_err();
        assert!(error.to_string().contains("kafkaa"), "{error}");
    }

    #[test]
    fn badly_typed_values_are_errors() {
        let sources = ConfigSources { file: None, environment: env(&[("KEEL_DATABASE__ACQUIRE_TIMEOUT_MS", "many")]) };
        let error = sources.load::<Tree>().unwrap_err().to_string();
        assert!(error.contains("KEEL_DATABASE__ACQUIRE_TIMEOUT_MS"), "{error}");
        // A number whose default is unset is parsed from the variable's text.
        let sources = ConfigSources { file: None, environment: env(&[("KEEL_DATABASE__MAX_CONNECTIONS", "many")]) };
        let error = sources.load::<Tree>().unwrap_err().to_string();
        assert!(error.contains("database.max_connections"), "{error}");
    }

    #[test]
    fn log_filters_must_parse() {
        assert!(LogConfig { filter: "info,keel=debug".into(), ..LogConfig::default() }.validate().is_ok());
        let error = LogConfig { filter: "info,keel=loud".into(), ..LogConfig::default() }.validate().unwrap_err();
        assert!(error.to_string().contains("log.filter"), "{error}");
    }

    #[test]
    fn tracing_settings_are_checked() {
        let valid = TracingConfig { otlp_endpoint: Some("http://127.0.0.1:4318".into()), ..TracingConfig::default() };
        assert!(valid.validate().is_ok());
        for (bad, path) in [
            (TracingConfig { sample_ratio: 1.5, ..TracingConfig::default() }, "tracing.sample_ratio"),
            (TracingConfig { queue_size: 0, ..TracingConfig::default() }, "tracing.queue_size"),
            (
                TracingConfig { otlp_endpoint: Some("collector:4318".into()), ..TracingConfig::default() },
                "tracing.otlp_endpoint",
            ),
        ] {
            let error = bad.validate().unwrap_err();
            assert!(error.to_string().contains(path), "{error}");
        }
    }

    #[test]
    fn secrets_are_redacted_when_dumped_and_debugged() {
        let sources = ConfigSources { file: None, environment: env(&[("KEEL_DATABASE__PASSWORD", "hunter2")]) };
        let tree: Tree = sources.load().unwrap();
        let dump = serde_json::to_string(&tree).unwrap();
        assert!(!dump.contains("hunter2") && dump.contains("[redacted]"), "{dump}");
        assert!(!format!("{tree:?}").contains("hunter2"));
    }
}
