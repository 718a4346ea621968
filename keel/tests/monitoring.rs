//! Monitoring as shipped under `deploy/`: the Prometheus configuration and alert rules pass
//! `promtool` (and its unit tests say when each alert fires), every metric they and the Grafana
//! dashboard name is one Keel exports, and a real Prometheus with these rules scrapes every role
//! of a running platform, evaluates every rule and every panel's query without error, and raises
//! the instance-down alert when a role dies.

mod support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use support::{IDENTITY_ROLES, Platform, Role, eventually, reserve_port};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool").args(args).output().expect("promtool is installed (scripts/infra ensure)");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Every query of the dashboard's panels.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/keel.json")).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "a dashboard of the platform: {} panels", panels.len());
    panels
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap().to_owned();
            panel["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |target| (title.clone(), target["expr"].as_str().unwrap().to_owned()))
        })
        .collect()
}

/// The `keel_…` metric names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("keel_") {
        let name: String =
            rest[start..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[start + name.len()..];
        names.insert(name);
    }
    names
}

#[test]
fn the_prometheus_configuration_and_alert_rules_check_and_fire_when_they_should() {
    let config = deploy("prometheus/prometheus.yml");
    let checked = promtool(&["check", "config", config.to_str().unwrap()]);
    assert!(checked.contains("SUCCESS") && checked.contains("alerts.yml"), "the rules are checked too:\n{checked}");
    let tests = promtool(&["test", "rules", deploy("prometheus/alerts.test.yml").to_str().unwrap()]);
    assert!(tests.contains("SUCCESS"), "{tests}");
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap();
    let tested = std::fs::read_to_string(deploy("prometheus/alerts.test.yml")).unwrap();
    for alert in rules.lines().filter_map(|line| line.trim().strip_prefix("- alert: ")) {
        assert!(tested.contains(&format!("alertname: {alert}")), "{alert} has no unit test");
    }
}

#[test]
fn the_alerts_and_the_dashboard_name_only_metrics_keel_exports() {
    let mut source = String::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs: Vec<PathBuf> = ["runtime", "commands", "clients", "discovery", "projections", "gateway", "keel/src"]
        .map(|dir| root.join(dir))
        .to_vec();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.ends_with("tests") {
                dirs.push(path);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                source.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut named = metric_names(&std::fs::read_to_string(deploy("prometheus/alerts.yml")).unwrap());
    named.extend(dashboard_queries().iter().flat_map(|(_, query)| metric_names(query)));
    assert!(named.len() >= 15, "{named:?}");
    for name in named {
        assert!(source.contains(&format!("\"{name}\"")), "{name} is not a metric Keel exports");
    }
}

/// A Prometheus server of the test's own, stopped on drop.
struct Prometheus {
    child: Child,
    url: String,
    _port: support::Port,
}

impl Prometheus {
    /// Scrapes `targets` (role, admin URL) every second with the repository's alert rules.
    fn start(dir: &Path, targets: &[(&str, String)]) -> Self {
        let mut config: serde_norway::Value =
            serde_norway::from_str(&std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap()).unwrap();
        config["global"]["scrape_interval"] = "1s".into();
        config["global"]["evaluation_interval"] = "1s".into();
        config["rule_files"] = serde_norway::to_value([deploy("prometheus/alerts.yml")]).unwrap();
        let static_configs: Vec<serde_json::Value> = targets
            .iter()
            .map(|(role, url)| serde_json::json!({"targets": [url.trim_start_matches("http://")], "labels": {"role": role}}))
            .collect();
        config["scrape_configs"][0]["static_configs"] = serde_norway::to_value(static_configs).unwrap();
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, serde_norway::to_string(&config).unwrap()).unwrap();
        let port = reserve_port();
        let address = format!("127.0.0.1:{}", port.number);
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (scripts/infra ensure)");
        Self { child, url: format!("http://{address}"), _port: port }
    }

    async fn api(&self, path: &str) -> Option<Value> {
        let answer: Value = reqwest::get(format!("{}/api/v1/{path}", self.url)).await.ok()?.json().await.ok()?;
        (answer["status"] == "success").then(|| answer["data"].clone())
    }

    async fn query(&self, query: &str) -> Result<Vec<Value>, String> {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/query", self.url)).unwrap();
        url.query_pairs_mut().append_pair("query", query);
        let response = reqwest::get(url).await.map_err(|error| error.to_string())?;
        let answer: Value = response.json().await.map_err(|error| error.to_string())?;
        match answer["status"].as_str() {
            Some("success") => Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default()),
            _ => Err(answer.to_string()),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_every_role_evaluates_every_rule_and_sees_a_role_die() {
    let mut platform = Platform::start_roles(IDENTITY_ROLES).await;
    platform.register(&reqwest::Client::new(), "watched@example.com", "Watched").await;
    let targets: Vec<(&str, String)> =
        IDENTITY_ROLES.iter().map(|role| (role.command(), platform.admin_url(*role).to_owned())).collect();
    let prometheus = Prometheus::start(&platform.dir, &targets);

    eventually(Duration::from_secs(60), "Prometheus to scrape every role", || async {
        let data = prometheus.api("targets").await?;
        let active = data["activeTargets"].as_array()?;
        (active.len() == targets.len() && active.iter().all(|target| target["health"] == "up")).then_some(())
    })
    .await;
    let rules = eventually(Duration::from_secs(60), "every rule evaluated", || async {
        let data = prometheus.api("rules").await?;
        let rules: Vec<Value> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.iter().all(|rule| !rule["lastEvaluation"].as_str().unwrap_or("0001").starts_with("0001"));
        (!rules.is_empty() && evaluated).then_some(rules)
    })
    .await;
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    assert!(rules.len() >= 9, "{} rules", rules.len());

    for (title, query) in dashboard_queries() {
        prometheus.query(&query).await.unwrap_or_else(|error| panic!("panel {title:?}: {error}"));
    }
    eventually(Duration::from_secs(30), "the command, lag and request series", || async {
        let commands = prometheus.query(r#"sum by (service) (keel_commands_total{service="identity"})"#).await.ok()?;
        let lag = prometheus.query("sum by (projection) (keel_projection_lag)").await.ok()?;
        let projections: BTreeSet<&str> =
            lag.iter().filter_map(|series| series["metric"]["projection"].as_str()).collect();
        (!commands.is_empty() && projections.contains("users") && projections.contains("audit")).then_some(())
    })
    .await;
    let down = prometheus.query(r#"ALERTS{alertname="KeelInstanceDown"}"#).await.unwrap();
    assert!(down.is_empty(), "no instance is down yet: {down:?}");

    // A role dies: its target goes down and the alert is pending (it fires after a minute).
    platform.kill9(Role::SecondIdentity);
    let alert = eventually(Duration::from_secs(60), "the instance-down alert", || async {
        let alerts = prometheus.api("alerts").await?;
        alerts["alerts"].as_array()?.iter().find(|alert| alert["labels"]["alertname"] == "KeelInstanceDown").cloned()
    })
    .await;
    let admin = platform.admin_url(Role::SecondIdentity).trim_start_matches("http://").to_owned();
    assert_eq!(alert["labels"]["instance"], admin.as_str(), "{alert}");
    assert_eq!(alert["labels"]["role"], "identity", "{alert}");
    assert_eq!(alert["state"], "pending", "{alert}");
}
