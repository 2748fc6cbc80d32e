//! Headless Chromium through chromedriver on 127.0.0.1, for the browser test.
//!
//! Skipped with a message when `chromium` or `chromedriver` is not installed, unless
//! `CONSOLE_BROWSER_TEST=require` (set by `.ci/run`, which installs both): then a missing browser
//! fails the test.
#![allow(clippy::print_stderr)] // the skip message

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};

/// A running chromedriver and a browser session on it; both end when this is dropped.
pub struct Browser {
    pub client: Client,
    driver: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// Starts chromedriver and a headless Chromium session, or says why not (`None`: skip).
pub async fn start() -> Option<Browser> {
    let required = std::env::var("CONSOLE_BROWSER_TEST").is_ok_and(|v| v == "require");
    let chromium = on_path("chromium").or_else(|| on_path("chromium-browser")).or_else(|| on_path("google-chrome"));
    let driver = on_path("chromedriver");
    let (Some(chromium), Some(driver)) = (chromium, driver) else {
        assert!(!required, "CONSOLE_BROWSER_TEST=require but chromium / chromedriver are not installed");
        eprintln!(
            "SKIPPED: the browser test needs `chromium` and `chromedriver` on PATH (Debian: apt-get install chromium \
             chromium-driver); .ci/run installs them and sets CONSOLE_BROWSER_TEST=require"
        );
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,2000", "--hide-scrollbars"],
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let client = loop {
        let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        match builder.capabilities(capabilities.clone()).connect(&url).await {
            Ok(client) => break client,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(30), "no chromedriver session: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    Some(Browser { client, driver: child })
}

/// Where screenshots go: `target/console-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from);
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
