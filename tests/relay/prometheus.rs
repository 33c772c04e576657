//! A real Prometheus server scrapes relayd's `/metrics` (it asks for OpenMetrics) and its
//! queries give back what a known workload counted. `.ci/run` installs prometheus; elsewhere
//! the test skips, saying why, if it is missing.

use crate::harness;

use std::process::{Command, Stdio};
use std::time::Instant;

use async_std::prelude::*;
use harness::backend::Backend;
use harness::daemon::TempFile;
use harness::{Harness, PATIENCE, free_port, within};

/// Stops Prometheus when the test ends, however it ends.
struct Server(std::process::Child, std::path::PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// The value of an instant query's single sample (from Prometheus' JSON, by its shape:
/// `"value":[<time>,"<value>"]`); `None` while there is none.
fn query(port: u16, expr: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-G", "--data-urlencode"])
        .arg(format!("query={expr}"))
        .arg(format!("http://127.0.0.1:{port}/api/v1/query"))
        .output()
        .ok()?;
    let body = String::from_utf8_lossy(&out.stdout).to_string();
    let value = body.split(r#""value":["#).nth(1)?;
    let value = value.split(']').next()?.split(',').nth(1)?;
    Some(value.trim_matches('"').to_string())
}

/// A listener Prometheus scrapes in place of the status page: it passes each scrape on to
/// `status` and tells the receiver once the answer has gone back.
async fn scrapes_of(status: std::net::SocketAddr) -> (std::net::SocketAddr, flume::Receiver<()>) {
    let front = async_std::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    let (done, scraped) = flume::bounded(8);
    async_std::task::spawn(async move {
        while let Ok((scraper, _)) = front.accept().await {
            let Ok(page) = async_std::net::TcpStream::connect(status).await else {
                continue;
            };
            let request = async_std::io::copy(scraper.clone(), page.clone());
            let answer = async_std::io::copy(page.clone(), scraper.clone());
            let _ = futures::future::select(Box::pin(request), Box::pin(answer)).await;
            // The status page answers and closes: the scrape is over.
            let _ = scraper.shutdown(std::net::Shutdown::Both);
            let _ = done.try_send(());
        }
    });
    (addr, scraped)
}

#[async_std::test]
async fn prometheus_scrapes_the_metrics_and_its_queries_count_the_workload() {
    if !harness::have(&["prometheus"], "prometheus") {
        return;
    }
    let echo = Backend::echo().await;
    let h = Harness::start(&format!(
        r#"(status: "127.0.0.1:0", routes: [(name: "web", listen: "127.0.0.1:0", backends: [(addr: "{}")])])"#,
        echo.addr
    ));
    for _ in 0..3 {
        let mut client = h.connect("web").await;
        client.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        within(client.read_exact(&mut echoed)).await.unwrap();
        assert_eq!(&echoed, b"hello");
    }
    h.relay().stats().until(|s| s.active() == 0).await;

    let status = h.relay().status_addr().unwrap();
    let (front, scraped) = scrapes_of(status).await;
    let config = TempFile::new(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: relayd\n    static_configs:\n      - targets: [\"{front}\"]\n"
        ),
    );
    let port = free_port();
    let data = std::env::temp_dir().join(format!("relayd-prometheus-{}", std::process::id()));
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.0.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let _server = Server(child, data);

    // After each scrape (bounded waits), until Prometheus answers with what it scraped.
    let began = Instant::now();
    let sessions = r#"relayd_sessions_opened_total{job="relayd",route="web"}"#;
    while query(port, sessions).as_deref() != Some("3") {
        assert!(began.elapsed() < 2 * PATIENCE, "Prometheus never saw 3 sessions");
        within(scraped.recv_async()).await.expect("the forwarder runs");
    }
    assert_eq!(query(port, r#"up{job="relayd"}"#).as_deref(), Some("1"));
    let bytes = r#"sum(relayd_relayed_bytes_total{route="web"})"#;
    assert_eq!(query(port, bytes).as_deref(), Some("30"), "5 bytes each way, 3 times");
    let state = format!(
        r#"relayd_backend_state{{route="web",backend="{}",state="up"}}"#,
        echo.addr
    );
    assert_eq!(query(port, &state).as_deref(), Some("1"));
    let connects = r#"sum(relayd_connect_duration_seconds_count{route="web"})"#;
    assert_eq!(
        query(port, connects).as_deref(),
        Some("3"),
        "the histogram is read as one"
    );
    assert_eq!(h.shutdown().await.forced, 0);
}
