//! Every `keel bench` subcommand, at a tiny size, against a real platform: the README's benchmark
//! commands keep working as the code under them changes. (The figures are the benches' business,
//! not a test's: nothing here asserts a speed.)

mod support;

use support::Platform;

/// Runs `keel bench ARGS` and returns what it printed, after checking it printed every line in
/// `expected` (a line starting with each).
fn bench(platform: &Platform, args: &[&str], expected: &[&str]) -> String {
    let mut full = vec!["bench"];
    full.extend_from_slice(args);
    let output = platform.keel_ok(&full);
    for start in expected {
        assert!(
            output.lines().any(|line| line.trim_start().starts_with(start)),
            "`keel bench {}` printed no line starting with {start:?}:\n{output}",
            args.join(" ")
        );
    }
    output
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bench_runs_at_a_tiny_size() {
    let platform = Platform::start().await;
    let client = reqwest::Client::new();
    let admin = platform.admin(&client).await;
    let gateway = platform.gateway_url.as_str();

    let replay = bench(
        &platform,
        &["replay", "--events", "200"],
        &["raw consume", "users rebuild", "raw COPY of the users rows", "audit rebuild", "users rebuild / raw COPY"],
    );
    assert!(replay.contains("replay of 200 events"), "{replay}");
    bench(&platform, &["broker", "--records", "300"], &["produce (idempotent, acks=all)", "consume"]);
    bench(
        &platform,
        &["commands", "--commands", "40", "--clients", "4", "--gateway", gateway],
        &["POST /v1/users (201)", "raw produce (idempotent)", "latency p99"],
    );
    bench(
        &platform,
        &[
            "streams",
            "--events",
            "20",
            "--clients",
            "2",
            "--writers",
            "2",
            "--gateway",
            gateway,
            "--token",
            &admin.access_token,
        ],
        &["deliveries expected", "delivery latency p99"],
    );
    let idle = bench(
        &platform,
        &["idle", "--seconds", "2", "--probes", "3", "--gateway", gateway],
        &["total", "answered", "in the users read model"],
    );
    assert!(idle.contains("keel gateway"), "the platform's own processes are measured:\n{idle}");
    let cpu = bench(&platform, &["cpu", "--seconds", "1"], &[]);
    let groups: serde_json::Value = serde_json::from_str(cpu.trim()).expect("bench cpu prints JSON");
    assert!(groups["keel projector"].is_number(), "{cpu}");
    bench(
        &platform,
        &["sustained", "--rate", "20", "--seconds", "4", "--window-seconds", "2", "--users", "3", "--gateway", gateway],
        &["window", "resident memory"],
    );
}
