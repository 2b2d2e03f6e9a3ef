//! The demo services (`sagahost-demo-services`, `demo/services`) as separate processes, one
//! process per service, for the `order-http` tests: started on port 0 with a fresh data
//! directory, SIGKILLed and started again on the same data directory and port, and read
//! through their own monitoring routes (`/effects/{order_id}`, `/stats`) and their idempotency
//! table.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::Connection as _;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// One demo service (`inventory`, `payment` or `shipping`) in its own process; killed when
/// dropped.
pub struct DemoService {
    pub service: &'static str,
    /// `http://127.0.0.1:<port>`: the origin to grant and the step's `base_url`.
    pub url: String,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl DemoService {
    /// Starts `service` on a port the system picks and a fresh data directory, with extra flags
    /// (`--slow-ms`, `--hold-ms`, `--sagahost-url`, ...).
    pub async fn start(service: &'static str, args: &[String]) -> DemoService {
        let dir = tempfile::tempdir().expect("temp dir");
        let (child, url) = launch(service, dir.path(), 0, args).await.unwrap_or_else(|e| panic!("{e}"));
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        DemoService {
            service,
            url,
            port,
            args: args.to_vec(),
            child: Some(child),
            dir,
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
        }
    }

    /// SIGKILL: no shutdown, exactly like a crash. Checks the process was running and died of it.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the service is running");
        assert!(matches!(child.try_wait(), Ok(None)), "{} had exited before the kill:\n{}", self.service, self.log());
        child.kill().await.expect("kill");
        let status = child.wait().await.expect("reaping the service");
        assert_eq!(status.signal(), Some(9), "{} did not die of SIGKILL: {status}", self.service);
    }

    /// Starts the service again on the same data directory and port (the saga definition
    /// keeps pointing at it). Retries briefly if the port is not free again yet.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart a killed service only");
        let start = Instant::now();
        loop {
            match launch(self.service, self.dir.path(), self.port, &self.args).await {
                Ok((child, url)) => {
                    assert_eq!(url, self.url, "restarted on the same address");
                    self.child = Some(child);
                    return;
                }
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    eprintln!("restarting {}: {e}; trying again", self.service);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// `GET /effects/{order_id}`: every effect of this service, with its count.
    pub async fn effects(&self, order_id: &str) -> serde_json::Map<String, Value> {
        let r = self.http.get(format!("{}/effects/{order_id}", self.url)).send().await.expect("GET /effects");
        assert!(r.status().is_success(), "{} /effects answered {}", self.service, r.status());
        let body: Value = r.json().await.expect("effects are JSON");
        assert_eq!(body["order_id"], order_id);
        body["effects"].as_object().cloned().expect("an effects object")
    }

    /// `GET /stats`: requests this process received since it started (monitoring reads aside).
    pub async fn requests(&self) -> u64 {
        let r = self.http.get(format!("{}/stats", self.url)).send().await.expect("GET /stats");
        r.json::<Value>().await.expect("stats are JSON")["requests"].as_u64().expect("a request count")
    }

    /// The idempotency keys this service stored (one per final answer it gave) starting with
    /// `prefix`, sorted: read from its SQLite file, which it keeps in WAL mode, so reading it
    /// while the service runs is safe.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let file = self.dir.path().join(format!("{}.db", self.service));
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&file).read_only(true);
        let mut conn = sqlx::SqliteConnection::connect_with(&options).await.expect("open the service's database");
        let keys: Vec<(String,)> =
            sqlx::query_as("SELECT key FROM idempotency WHERE substr(key, 1, ?) = ? ORDER BY key")
                .bind(prefix.len() as i64)
                .bind(prefix)
                .fetch_all(&mut conn)
                .await
                .expect("read the idempotency table");
        conn.close().await.ok();
        keys.into_iter().map(|(k,)| k).collect()
    }

    /// What the service wrote to stderr (all its runs), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }
}

/// Starts the binary for one service on `127.0.0.1:port` and waits for its `listening` line.
async fn launch(service: &str, dir: &Path, port: u16, args: &[String]) -> Result<(Child, String), String> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("service.log")).unwrap();
    let mut child = Command::new(crate::process::workspace_binary("sagahost-demo-services"))
        .arg("--service")
        .arg(service)
        .arg("--data-dir")
        .arg(dir)
        .arg(format!("--{service}-addr"))
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("sagahost-demo-services starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => {
            let _ = child.kill().await;
            let log = std::fs::read_to_string(dir.join("service.log")).unwrap_or_default();
            return Err(format!("{service} printed no listening line ({other:?}); its log:\n{log}"));
        }
    };
    let url = match line.split(' ').collect::<Vec<_>>()[..] {
        ["listening", name, url] if name == service && url.starts_with("http://127.0.0.1:") => url.to_owned(),
        _ => panic!("unexpected stdout line of {service}: {line:?}"),
    };
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}
