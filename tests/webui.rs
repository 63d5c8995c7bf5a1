//! The web UI in a real browser: headless Chromium driven by `tests/webui/ui.mjs`
//! (playwright-core) against a mock server: stream, stop, regenerate, a refusal shown as a
//! notice, clear. The screenshot is saved to `target/webui.png`.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chatstream::server::model::{GenParams, MockChat, MockMode};
use chatstream::server::roles::Roles;
use chatstream::server::ServerConfig;
use chatstream::SamplingParams;
use common::client::TestServer;

#[test]
fn web_ui_streams_stops_regenerates_and_clears_in_chromium() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} not found: install Debian's chromium (scripts/test.sh does)"
    );
    assert!(
        dir.join("tests/webui/node_modules/playwright-core")
            .exists(),
        "run `npm ci --prefix tests/webui` (scripts/test.sh does)"
    );
    let cfg = ServerConfig {
        concurrency: 1,
        max_queue: 0,
        default_params: GenParams {
            sampling: SamplingParams::default(),
            max_new_tokens: 40,
            stop: vec![],
        },
        ui_title: "Test UI".into(),
        ui_welcome: "Welcome, tester".into(),
        roles: Roles::open(),
        ..ServerConfig::default()
    };
    let s = TestServer::start(
        cfg,
        Arc::new(MockChat::new(MockMode::Long, Duration::from_millis(40))),
    );
    let shot = dir.join("target/webui.png");
    let out = Command::new("node")
        .arg(dir.join("tests/webui/ui.mjs"))
        .arg(format!("http://{}/", s.addr))
        .arg(&shot)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("running node");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(log.contains("webui test passed"), "{log}");
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 1000)
            .unwrap_or(false),
        "no screenshot at {}",
        shot.display()
    );
}
