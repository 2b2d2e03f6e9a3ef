//! The real binary as a separate process: the `listening` lines, SIGKILL and restart on the
//! same data directory, SIGTERM.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::common::*;

/// The binary, running; killed when dropped.
struct Process {
    child: Child,
    urls: HashMap<String, String>,
}

impl Process {
    /// Starts the binary on port 0 over `data_dir` and waits for its `listening` lines.
    async fn start(data_dir: &Path, args: &[&str], expected: &[&str]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sagahost-demo-services"))
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--inventory-addr",
                "127.0.0.1:0",
                "--payment-addr",
                "127.0.0.1:0",
                "--shipping-addr",
                "127.0.0.1:0",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut urls = HashMap::new();
        while urls.len() < expected.len() {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .expect("a listening line within 30 s")
                .unwrap()
                .expect("stdout stays open");
            let mut parts = line.split(' ');
            let (Some("listening"), Some(name), Some(url), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                panic!("unexpected stdout line {line:?}");
            };
            assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with(":0"), "{line}");
            urls.insert(name.to_owned(), url.to_owned());
        }
        let mut names: Vec<_> = urls.keys().cloned().collect();
        names.sort();
        assert_eq!(names, expected);
        // Keep draining stdout so that the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Process { child, urls }
    }

    fn url(&self, name: &str) -> &str {
        &self.urls[name]
    }

    async fn signal(&mut self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().await.unwrap();
        assert!(status.success());
    }
}

const ALL: &[&str] = &["inventory", "payment", "shipping"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_keep_answers_counts_and_pending_webhooks() {
    let (_tmp, dir) = data_dir();
    // Nobody listens at the first sagahost address: the webhook keeps failing until the kill.
    // The socket is bound and never listens, for the whole test: connections are refused and no
    // other process can take the port (a port bound and released at once could be).
    let refusing = tokio::net::TcpSocket::new_v4().unwrap();
    refusing.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let nowhere = format!("http://{}", refusing.local_addr().unwrap());
    let mut p = Process::start(&dir, &["--sagahost-url", &nowhere, "--hold-ms", "5000"], ALL).await;
    let (inv, pay) = (p.url("inventory").to_owned(), p.url("payment").to_owned());
    let reserved = post(&format!("{inv}/reservations"), Some("k-r"), &reservation("o-1", "SKU-1")).await;
    assert_eq!(reserved.status, 201);
    assert_eq!(post(&format!("{pay}/charges"), Some("k-3ds"), &charge("o-3ds", "tok_3ds")).await.status, 202);
    assert_eq!(post(&format!("{pay}/charges/o-3ds/confirm"), None, "").await.status, 200);
    // A charge that commits and then holds its answer: the client never hears back.
    let held = tokio::spawn({
        let pay = pay.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{pay}/charges"))
                .header("idempotency-key", "k-hold")
                .body(charge("o-hold", "tok_hold"))
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.child.kill().await.unwrap(); // SIGKILL
    assert!(held.await.unwrap().is_err(), "the held answer was never sent");

    let sagahost = Recorder::start(0).await;
    let p = Process::start(&dir, &["--sagahost-url", &sagahost.url], ALL).await;
    let (inv, pay) = (p.url("inventory"), p.url("payment"));
    let again = post(&format!("{inv}/reservations"), Some("k-r"), &reservation("o-1", "SKU-1")).await;
    assert_eq!((again.status, again.replayed, again.raw), (201, true, reserved.raw));
    let retry = post(&format!("{pay}/charges"), Some("k-hold"), &charge("o-hold", "tok_hold")).await;
    assert_eq!((retry.status, retry.replayed), (201, true), "the retry replays the charge committed before the kill");
    assert_eq!(effects(pay, "o-hold").await, json!({ "charge": 1, "refund": 0 }));
    assert_eq!(effects(pay, "o-3ds").await, json!({ "charge": 1, "refund": 0 }));
    assert_eq!(effects(inv, "o-1").await, json!({ "reserve": 1, "release": 0 }));
    // The confirmation's signal was still pending: the restarted service sends it.
    let seen = sagahost.wait_for(1).await;
    assert_eq!(seen[0].path, "/sagas/order-http/o-3ds/signals/payment-confirmed");
    assert_eq!(seen[0].body, json!({ "charge_id": "ch_o-3ds" }));
    assert_eq!(seen[0].authorization, None, "no token configured, no Authorization header");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_one_service_cleanly() {
    let (_tmp, dir) = data_dir();
    let mut p = Process::start(&dir, &["--service", "payment"], &["payment"]).await;
    assert_eq!(get(&format!("{}/healthz", p.url("payment"))).await.status, 200);
    assert!(dir.join("payment.db").exists());
    assert!(!dir.join("inventory.db").exists(), "only the payment service runs");
    p.signal("-TERM").await;
    let status =
        tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await.expect("exits on SIGTERM").unwrap();
    assert!(status.success(), "{status}");
}
