//! The console (`/console`) in headless Chromium against the real platform: it loads, signs in,
//! shows the projections' status and lag, shows an event produced during the test, and its
//! filter works. The browser is Debian's `chromium`, driven by playwright-core; both are
//! installed by `scripts/infra ensure` (which `scripts/test` runs).

mod support;

use std::{path::PathBuf, process::Command};

use support::Platform;

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_a_live_filtered_stream_and_the_projections() {
    let playwright =
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/keel/browser/node_modules/playwright-core");
    assert!(
        playwright.join("package.json").exists() && PathBuf::from("/usr/bin/chromium").exists(),
        "the console test needs Chromium and playwright-core: run scripts/infra ensure"
    );
    let platform = Platform::start().await;
    let client = reqwest::Client::new();
    platform.admin(&client).await;
    let screenshot = platform.dir.join("console.png");
    let output = Command::new("node")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/console/check.cjs"))
        .env("PLAYWRIGHT_CORE", &playwright)
        .env("GATEWAY", &platform.gateway_url)
        .env("EMAIL", support::ADMIN_EMAIL)
        .env("PASSWORD", support::PASSWORD)
        .env("SCREENSHOT", &screenshot)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "the console check failed (screenshot: {}):\n{stdout}\n{}",
        screenshot.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ok: the filter keeps the post's PostDrafted out"));
}
