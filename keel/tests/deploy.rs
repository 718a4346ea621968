//! The Kubernetes manifests under `deploy/kubernetes`: valid objects of a current Kubernetes (by
//! kubernetes-validate, which ships the schemas), every role probed on its admin port, every
//! service discoverable through a headless Service, and a configuration Keel accepts.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;
use serde_norway::Value;

/// The Kubernetes version whose schemas the manifests must satisfy.
const KUBERNETES_VERSION: &str = "1.33.0";

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every object of every manifest.
fn objects() -> Vec<Value> {
    manifests()
        .iter()
        .flat_map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            serde_norway::Deserializer::from_str(&text)
                .map(|document| Value::deserialize(document).unwrap())
                .filter(|object| !object.is_null())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|object| object["kind"].as_str() == Some(kind)).collect()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// `kubernetes-validate` as `scripts/infra ensure` installs it, or `KUBERNETES_VALIDATE`.
fn validator() -> PathBuf {
    std::env::var("KUBERNETES_VALIDATE").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/keel/venv/bin/kubernetes-validate")
    })
}

#[test]
fn the_manifests_are_valid_kubernetes_objects() {
    let files = manifests();
    assert!(files.len() >= 8, "{files:?}");
    let output = Command::new(validator())
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .expect("kubernetes-validate is installed (scripts/infra ensure)");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{report}");

    // The validator refuses what it should: a Deployment with a field Kubernetes does not know.
    let dir = tempfile_dir();
    let broken = dir.join("broken.yaml");
    let identity =
        std::fs::read_to_string(files.iter().find(|path| path.ends_with("20-identity.yaml")).unwrap()).unwrap();
    std::fs::write(&broken, identity.replace("  replicas: 2", "  replicas: 2\n  replica: 3")).unwrap();
    let refused = Command::new(validator())
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!refused.status.success(), "an unknown field is refused");
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("keel-tests").join(uuid::Uuid::new_v4().simple().to_string());
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_role_is_probed_on_its_admin_port_and_every_service_has_a_headless_service() {
    let objects = objects();
    let config = of_kind(&objects, "ConfigMap")[0]["data"].clone();
    let mut roles = Vec::new();
    for deployment in of_kind(&objects, "Deployment") {
        let name = text(&deployment["metadata"]["name"]);
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        roles.push(text(&container["args"][0]).to_owned());
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/livez")] {
            assert_eq!(text(&container[probe]["httpGet"]["path"]), path, "{name} {probe}");
            assert_eq!(text(&container[probe]["httpGet"]["port"]), "admin", "{name} {probe}");
        }
        let ports = container["ports"].as_sequence().unwrap();
        assert!(ports.iter().any(|port| text(&port["name"]) == "admin"), "{name} names its admin port");
        let grpc = ports.iter().find(|port| text(&port["name"]) == "grpc");
        if let Some(grpc) = grpc {
            // Found through its headless Service, whose name the configuration gives callers.
            let port = grpc["containerPort"].as_u64().unwrap();
            let headless = of_kind(&objects, "Service")
                .into_iter()
                .find(|service| text(&service["metadata"]["name"]) == format!("{name}-headless"))
                .unwrap_or_else(|| panic!("{name} has a headless Service"));
            assert_eq!(text(&headless["spec"]["clusterIP"]), "None", "{name}-headless is headless");
            assert_eq!(text(&headless["spec"]["selector"]["app.kubernetes.io/name"]), name);
            let key = format!("KEEL_DISCOVERY__KUBERNETES__SERVICES__{}", name.to_uppercase());
            assert_eq!(text(&config[key.as_str()]), format!("{name}-headless.keel.svc.cluster.local:{port}"));
        }
    }
    roles.sort();
    assert_eq!(roles, ["auth", "authz", "blog", "gateway", "identity", "projector", "registry"]);
    assert_eq!(text(&config["KEEL_DISCOVERY__BACKEND"]), "kubernetes");
}

#[test]
fn keel_accepts_the_configuration_of_every_deployment() {
    let objects = objects();
    let config: BTreeMap<String, String> = of_kind(&objects, "ConfigMap")[0]["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(key, value)| (text(key).to_owned(), text(value).to_owned()))
        .collect();
    for deployment in of_kind(&objects, "Deployment") {
        let name = text(&deployment["metadata"]["name"]);
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command.args(["config", "dump"]).env_clear().envs(&config);
        for variable in container["env"].as_sequence().unwrap() {
            if let Some(value) = variable["value"].as_str() {
                command.env(text(&variable["name"]), value.replace("$(POD_IP)", "10.0.0.5"));
            }
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
