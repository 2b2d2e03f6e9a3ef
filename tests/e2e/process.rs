//! The real `sagahost` binary as a child process, for tests that kill it (SIGKILL or an armed
//! failpoint) and restart it on the same data directory.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// An address where nothing answers while the returned socket lives: the socket is bound to
/// a port the system picks and never listens, so a connection is refused, and no one else can
/// bind the port meanwhile. (A port bound and released at once could be taken by a host
/// another test starts on port 0, and the test would reach it.)
pub fn refusing_addr() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind(([127, 0, 0, 1], 0).into()).expect("binding a port the system picks");
    let addr = socket.local_addr().expect("its address");
    (socket, addr)
}

/// The `sagahost` binary cargo built next to this test binary (`target/<profile>/sagahost`).
pub fn binary() -> PathBuf {
    workspace_binary("sagahost")
}

/// A binary of the workspace that `cargo build --workspace` put next to this test binary
/// (`target/<profile>/<name>`): test runners build only test targets.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} is missing: build the workspace first (./scripts/test does)", bin.display());
    bin
}

pub struct HostProcess {
    child: Child,
    pub base: String,
    pub data_dir: PathBuf,
    /// Where the host writes the address it listens on (`--addr-file`): the harness asks for
    /// port 0, so no other process can take the port between its choice and the bind.
    pub addr_file: PathBuf,
}

impl HostProcess {
    /// Starts `sagahost serve` on `data_dir` (and the suite's backend, see the harness), with
    /// failpoints armed if given, and waits until it answers `/healthz`.
    pub async fn spawn(data_dir: &Path, failpoints: Option<&str>, extra_env: &[(&str, &str)]) -> HostProcess {
        let database = crate::harness::database_for(data_dir).await;
        Self::spawn_on(data_dir, database.as_deref(), failpoints, extra_env).await
    }

    /// Starts `sagahost serve` on `data_dir` and the given database URL (None: SQLite in the
    /// data dir): several of these on one PostgreSQL database are replicas.
    pub async fn spawn_on(
        data_dir: &Path,
        database: Option<&str>,
        failpoints: Option<&str>,
        extra_env: &[(&str, &str)],
    ) -> HostProcess {
        // One name per spawn: a test may start a second process on a data dir whose first one
        // still runs (or left its file behind when killed).
        static SPAWNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SPAWNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let addr_file = data_dir.join(format!("host-{n}.addr"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join("host.log")).unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .env_remove("SAGAHOST_FAILPOINTS")
            .env_remove("SAGAHOST_DATABASE")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if let Some(url) = database {
            cmd.arg("--database").arg(url);
        }
        if let Some(fp) = failpoints {
            cmd.env("SAGAHOST_FAILPOINTS", fp);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("sagahost starts");
        let mut host = HostProcess { child, base: String::new(), data_dir: data_dir.to_owned(), addr_file };
        host.base = format!("http://{}", host.wait_addr().await);
        host.wait_healthy().await;
        host
    }

    /// Waits for the host to write `--addr-file`, and returns the address in it.
    async fn wait_addr(&mut self) -> String {
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.addr_file) {
                let addr = text.trim_end();
                assert!(
                    text.ends_with('\n') && addr.parse::<std::net::SocketAddr>().is_ok(),
                    "{} holds {text:?}, not an address and a newline",
                    self.addr_file.display()
                );
                return addr.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sagahost exited during start-up ({status}); see {}/host.log", self.data_dir.display());
            }
            assert!(start.elapsed() < Duration::from_secs(60), "sagahost wrote no address file in 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_healthy(&mut self) {
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", self.base)).timeout(Duration::from_secs(1)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sagahost exited during start-up ({status}); see {}/host.log", self.data_dir.display());
            }
            assert!(start.elapsed() < Duration::from_secs(60), "sagahost did not become healthy in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, e.g. for `sagahost bench --pid`.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("host running")
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("host running").to_string();
        let ok = std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGSTOP: the process freezes mid-instruction with its connections open, like a VM
    /// pause or a long stall.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`HostProcess::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// A counter or gauge from `/metrics`, summed over its label sets (0 if absent, or if the
    /// host does not answer within 2 s: it may be frozen).
    pub async fn metric(&self, name: &str) -> f64 {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let Ok(r) = client.get(format!("{}/metrics", self.base)).send().await else { return 0.0 };
        let Ok(text) = r.text().await else { return 0.0 };
        text.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGKILL: no shutdown, no flushing, exactly like a crash. Checks that the process was
    /// running and died of the SIGKILL (not of something else before it).
    pub async fn kill(mut self) {
        assert!(
            matches!(self.child.try_wait(), Ok(None)),
            "the host had already exited before the kill; see {}/host.log",
            self.data_dir.display()
        );
        self.child.kill().await.expect("kill");
        let status = self.child.wait().await.expect("reaping the killed host");
        assert_eq!(status.signal(), Some(9), "the host did not die of SIGKILL: {status}");
    }

    /// SIGTERM (a graceful stop, as an orchestrator sends it); waits up to `within` for the
    /// process to exit and returns its exit status.
    pub async fn terminate(mut self, within: Duration) -> ExitStatus {
        self.signal("-TERM");
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("reaping the host"),
            Err(_) => panic!("the host did not exit within {within:?} of SIGTERM"),
        }
    }

    /// Waits for the process to die on its own (an armed failpoint); its exit status if it did.
    pub async fn wait_death(&mut self, within: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(within, self.child.wait()).await.ok().map(|r| r.expect("reaping the host"))
    }

    /// Waits for the process to die at the failpoint `name` on its `hit`-th hit, and checks
    /// that it did: the exit was SIGABRT (`std::process::abort`), and the log holds the
    /// failpoint's own marker line. A death anywhere else (a panic, an unrelated abort, an
    /// exit) fails the test.
    pub async fn wait_failpoint(&mut self, name: &str, hit: u64, within: Duration) {
        let Some(status) = self.wait_death(within).await else {
            panic!("failpoint {name} never fired in {within:?}");
        };
        assert_eq!(status.signal(), Some(6), "the host did not abort at failpoint {name}: {status}");
        let marker = format!("failpoint {name} hit {hit} times: aborting");
        let log = self.log();
        assert!(log.contains(&marker), "the host died, but not at {name} (no {marker:?} in its log):\n{log}");
    }

    /// Everything the host (and its predecessors on this data dir) wrote to stdout and stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("host.log")).unwrap_or_default()
    }
}

/// What one run of the `sagahost` binary as a command (the CLI, `plugin run`) did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Asserts the exit code; returns the run for more checks.
    pub fn exits(self, code: i32) -> Run {
        assert_eq!(self.code, code, "exit code of {self:#?}");
        self
    }
}

/// Runs `sagahost ARGS` to its end (at most 60 s) with a clean environment (none of the
/// SAGAHOST_* variables of whoever runs the tests, no NO_COLOR), `env` added.
pub async fn run_command(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(binary());
    cmd.args(args).kill_on_drop(true);
    for var in ["SAGAHOST_URL", "SAGAHOST_ADMIN_TOKEN", "SAGAHOST_API_TOKEN", "SAGAHOST_ACTOR", "NO_COLOR"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("sagahost {args:?} did not end within 60 s"))
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `sagahost plugin run ARGS`, with a 30 s call timeout unless ARGS set `--timeout-ms`: the
/// 1 s default is the host's, and on a loaded test machine a call may wait that long for a
/// core; only a test about the timeout sets its own.
pub async fn plugin_run(args: &[&str]) -> Run {
    let mut all = vec!["plugin", "run"];
    all.extend_from_slice(args);
    if !args.contains(&"--timeout-ms") {
        all.extend(["--timeout-ms", "30000"]);
    }
    run_command(&all, &[]).await
}
