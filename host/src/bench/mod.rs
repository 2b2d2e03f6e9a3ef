//! `sagahost bench`: a load generator users run against their own deployment, in the manner
//! of `pgbench` or `redis-benchmark`.
//!
//! It creates sagas over the public HTTP API with the demo triggers of SPEC §7 (by default
//! 90% orders that complete and 10% that are compensated), follows each one until it is
//! final, checks that it ended as its trigger says, and reports latency percentiles
//! (HdrHistogram), throughput, every kind of failure, figures from the servers' `/metrics`,
//! and CPU time per saga. Two modes: a closed loop of concurrent clients, and an open loop at
//! a fixed arrival rate whose latency counts from each send's scheduled time (see
//! [`schedule`]); a sweep runs the open loop at several rates and can draw a chart.
//!
//! This module is a client of the host, nothing more: it reaches a server only over HTTP and
//! uses no part of the host's internals but [`crate::builtin`]'s routes (a tidy test checks
//! it). `main.rs` only wires the subcommand.

pub mod chart;
pub mod client;
pub mod load;
pub mod mix;
pub mod report;
pub mod schedule;
pub mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::client::Client;
use self::load::{Generator, Limit, Measured};
use self::mix::{Bodies, Mix};
use self::report::{Parameters, Report, Run, Warmup};
use self::schedule::Schedule;
use self::server::Scrape;
use crate::builtin;

/// `sagahost bench`: the flags.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
Modes:
  closed loop (default)   --clients N concurrent clients, each sending its next saga once the last one settled,
                          for --sagas N in all (default 1000) or --duration SECS
  open loop               --rate R sagas/s on a fixed schedule, for --duration SECS (default 10) or --sagas N;
                          latency counts from each send's scheduled time, so queueing is not hidden
  sweep                   --sweep --rates R1,R2,...: the open loop at each rate for --duration SECS;
                          --chart FILE.svg draws throughput and p50/p99 latency against offered load

Exit status: 0 when every saga ended as its trigger says, 1 when some did not (the report is
still written), 2 when the benchmark could not run, 130 when stopped by Ctrl-C.

Example: sagahost bench --url http://127.0.0.1:8080 --clients 32 --sagas 2000 --json out.json")]
pub struct Args {
    /// Base URL of a sagahost; repeat the flag (or comma-separate) for replicas: requests are
    /// spread over them round-robin.
    #[arg(long = "url", env = "SAGAHOST_URL", value_delimiter = ',', default_value = "http://127.0.0.1:8080", value_parser = client::parse_url)]
    pub urls: Vec<String>,
    /// Where to scrape /metrics (repeatable). Default: every --url. Give each replica's own URL
    /// when --url is a load balancer.
    #[arg(long = "metrics-url", value_delimiter = ',', value_parser = client::parse_url)]
    pub metrics_urls: Vec<String>,
    /// Saga type to create: `order` posts to /orders, any other type to /sagas/{type}. The
    /// body is an order like the README's example, so the type must take one (order, order-http).
    #[arg(long, default_value = builtin::order::SAGA_TYPE)]
    pub saga: String,
    /// Bearer token for the client routes, when the host runs with --api-token.
    #[arg(long, env = "SAGAHOST_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// The triggers to send and their weights: complete (COMPLETED), compensate (no carrier:
    /// payment refunded, inventory released; CANCELLED), decline (card declined; CANCELLED),
    /// out-of-stock (CANCELLED, nothing to compensate), flaky (two retries; COMPLETED).
    #[arg(long, default_value_t = Mix::default(), value_parser = Mix::parse)]
    pub mix: Mix,
    /// Seed of the trigger draw: the same seed sends the same sequence of triggers.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Closed loop: concurrent clients. Also the concurrency of the warm-up.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub clients: u32,
    /// Sagas to measure (per rate in a sweep). Closed-loop default: 1000 unless --duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub sagas: Option<u64>,
    /// How long to send, in seconds (per rate in a sweep). Open-loop default: 10 unless --sagas.
    #[arg(long, value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// Open loop at this many sagas per second.
    #[arg(long, value_parser = parse_rate, conflicts_with = "sweep")]
    pub rate: Option<f64>,
    /// Open loop at each of --rates in turn, --duration seconds each.
    #[arg(long)]
    pub sweep: bool,
    /// The offered rates of a sweep, sagas per second.
    #[arg(long, value_delimiter = ',', default_value = "100,250,500,1000", value_parser = parse_rate)]
    pub rates: Vec<f64>,
    /// Open loop: the most sagas in flight at once; a send due beyond it is dropped and
    /// counted as a failure.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Sagas sent first and not measured (compiled plugins, warm pools and caches).
    #[arg(long, default_value_t = 50)]
    pub warmup: u64,
    /// `Prefer: wait` seconds on each POST (at most 30); 0 sends none and polls instead.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=30))]
    pub wait: u64,
    /// How long one saga may take before it counts as unsettled, in seconds (at most a day).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub timeout: u64,
    /// A local server process to measure the CPU time of (repeatable; Linux /proc).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// What to print on stdout: the human summary, or the JSON report.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
    /// Free text recorded in the report and used as the chart's legend (e.g. "sqlite, 1 host");
    /// with --plot, the chart's title.
    #[arg(long)]
    pub label: Option<String>,
    /// The commit to record. Default: `git` in the working directory, if it is a checkout.
    #[arg(long, env = "SAGAHOST_GIT_COMMIT")]
    pub commit: Option<String>,
    /// Draw the sweep as an SVG chart here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Draw --chart from these saved JSON reports (one series each) instead of running.
    #[arg(long = "plot", requires = "chart")]
    pub plot: Vec<PathBuf>,
}

/// The longest `--duration` and `--timeout`: a day. Longer ones overflowed the clock's
/// arithmetic (a panic in every saga's task, and a run that "measured" nothing exited 0).
const MAX_SECS: u64 = 86_400;

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("expected seconds, e.g. 10 or 2.5; got '{s}'"))?;
    if secs.is_finite() && secs > 0.0 && secs <= MAX_SECS as f64 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("the duration must be above 0 seconds and at most {MAX_SECS} (a day), got {s}"))
    }
}

/// The highest offered rate: past it the pacer would queue sends faster than any dispatcher
/// hands them out, and the queue (and the run) would grow without bound.
const MAX_RATE: f64 = 1_000_000.0;

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.trim().parse().map_err(|_| format!("expected sagas per second, e.g. 250; got '{s}'"))?;
    if rate > MAX_RATE {
        return Err(format!("the rate must be at most {MAX_RATE} sagas per second, got {s}"));
    }
    Schedule::new(rate).map(|s| s.rate())
}

/// Which runs to make.
enum Plan {
    Closed { clients: usize },
    Open { rates: Vec<f64> },
}

/// Runs the benchmark the flags describe and reports it; the exit status says how it went.
pub async fn run(args: Args) -> ExitCode {
    match execute(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sagahost bench: {e}");
            ExitCode::from(2)
        }
    }
}

async fn execute(args: Args) -> Result<ExitCode, String> {
    if !args.plot.is_empty() {
        let chart = args.chart.as_deref().expect("clap requires --chart with --plot");
        plot(&args.plot, chart, args.label.as_deref())?;
        eprintln!("sagahost bench: chart written to {}", chart.display());
        return Ok(ExitCode::SUCCESS);
    }
    let (plan, mode) = if args.sweep {
        (Plan::Open { rates: args.rates.clone() }, "sweep")
    } else if let Some(rate) = args.rate {
        (Plan::Open { rates: vec![rate] }, "open")
    } else {
        (Plan::Closed { clients: args.clients as usize }, "closed")
    };
    if args.chart.is_some() && mode != "sweep" {
        return Err("--chart draws a sweep: add --sweep (or --plot FILE to draw saved reports)".to_owned());
    }
    let limit = match plan {
        Plan::Closed { .. } if args.sagas.is_none() && args.duration.is_none() => {
            Limit { sagas: Some(1000), duration: None }
        }
        Plan::Open { .. } if args.sagas.is_none() && args.duration.is_none() => {
            Limit { sagas: None, duration: Some(Duration::from_secs(10)) }
        }
        _ => Limit { sagas: args.sagas, duration: args.duration },
    };
    let path = builtin::collection(&args.saga);
    let metrics_urls = if args.metrics_urls.is_empty() { dedup(&args.urls) } else { args.metrics_urls.clone() };
    let client = Client::new(&args.urls, &path, args.api_token.as_deref(), args.wait)?;
    for base in dedup(&args.urls) {
        match client.get_text(&base, "/healthz", Duration::from_secs(5)).await {
            Ok((status, _)) if status.is_success() => {}
            Ok((status, body)) => {
                return Err(format!("{base}/healthz answered {status}: {}; is this a sagahost?", body.trim()))
            }
            Err(e) => {
                return Err(format!("cannot reach {base}: {e}; is `sagahost serve` running there (check --url)?"))
            }
        }
    }

    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("sagahost bench: stopping; sagas in flight are abandoned");
                stop.cancel();
            }
        });
    }
    let generator = Arc::new(Generator {
        client,
        mix: args.mix.clone(),
        seed: args.seed,
        bodies: Bodies::new(),
        key_prefix: format!("bench-{}", uuid::Uuid::new_v4().simple()),
        next: AtomicU64::new(0),
        timeout: Duration::from_secs(args.timeout),
        stop: stop.clone(),
    });
    let text = args.output == "text";
    let say = |s: &str| {
        if text {
            print!("{s}");
        } else {
            eprint!("{s}");
        }
    };
    say(&format!(
        "sagahost bench {}: {} sagas at {path} on {} URL(s), mix {}, seed {}\n",
        env!("CARGO_PKG_VERSION"),
        args.saga,
        args.urls.len(),
        args.mix,
        args.seed
    ));

    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let warmup = if args.warmup > 0 {
        let clients = (args.clients as usize).min(args.warmup as usize);
        let m = load::closed(&generator, clients, Limit { sagas: Some(args.warmup), duration: None }).await;
        let warm = Warmup { sagas: m.tally.sent, ok: m.tally.ok(), failed: m.tally.failed() };
        say(&format!("warm-up: {} sagas, {} as expected, {} failed\n", warm.sagas, warm.ok, warm.failed));
        if warm.ok == 0 && warm.failed > 0 {
            let first = m.tally.samples.first().cloned().unwrap_or_default();
            return Err(format!(
                "none of the {} warm-up sagas ended as expected (first: {first}); check --url, --saga and --api-token",
                warm.failed
            ));
        }
        if warm.failed > 0 {
            eprintln!("sagahost bench: warning: {} warm-up sagas failed, e.g. {:?}", warm.failed, m.tally.samples);
        }
        Some(warm)
    } else {
        None
    };

    let pids: Vec<String> = args.pids.iter().map(u32::to_string).collect();
    let mut runs = Vec::new();
    match &plan {
        Plan::Closed { clients } => {
            let run = measure(&generator, &metrics_urls, &pids, "closed", Some(*clients), None, || {
                load::closed(&generator, *clients, limit)
            })
            .await;
            say(&run.summary());
            runs.push(run);
        }
        Plan::Open { rates } => {
            for &rate in rates {
                if stop.is_cancelled() {
                    break;
                }
                let schedule = Schedule::new(rate)?;
                let max = args.max_in_flight as usize;
                let run = measure(&generator, &metrics_urls, &pids, "open", None, Some(rate), || {
                    load::open(&generator, schedule, max, limit)
                })
                .await;
                say(&run.summary());
                runs.push(run);
            }
            if mode == "sweep" {
                say(&report::sweep_table(&runs));
            }
        }
    }
    let interrupted = stop.is_cancelled();
    if let Some(last) = runs.last_mut() {
        last.interrupted = interrupted;
    }
    let samples: Vec<&String> = runs.iter().flat_map(|r| &r.error_samples).take(5).collect();
    if !samples.is_empty() {
        eprintln!("sagahost bench: some sagas failed; the first:");
        for s in samples {
            eprintln!("  {s}");
        }
    }
    let failed = runs.iter().any(|r| r.failed > 0);

    let report = Report {
        tool: "sagahost bench",
        sagahost_version: env!("CARGO_PKG_VERSION"),
        git_commit: args.commit.clone().or_else(git_commit),
        label: args.label.clone(),
        started_at,
        parameters: Parameters {
            mode,
            urls: args.urls.clone(),
            metrics_urls,
            saga: args.saga.clone(),
            path,
            mix: args.mix.to_string(),
            seed: args.seed,
            clients: args.clients as usize,
            sagas: limit.sagas,
            duration_s: limit.duration.map(|d| d.as_secs_f64()),
            rates: match &plan {
                Plan::Open { rates } => rates.clone(),
                Plan::Closed { .. } => vec![],
            },
            max_in_flight: args.max_in_flight as usize,
            warmup: args.warmup,
            wait_s: args.wait,
            timeout_s: args.timeout,
            pids: args.pids.clone(),
        },
        warmup,
        runs,
        interrupted,
    };
    let json = serde_json::to_string_pretty(&report).expect("the report serialises");
    if let Some(path) = &args.json {
        write_file(path, json.as_bytes())?;
        say(&format!("report written to {}\n", path.display()));
    }
    if !text {
        println!("{json}");
    }
    if let Some(chart) = &args.chart {
        let series = vec![chart::Series { label: series_label(&report), points: points(&report.runs) }];
        chart::render(chart, &chart_title(&report), &series)?;
        say(&format!("chart written to {}\n", chart.display()));
    }
    Ok(if interrupted {
        ExitCode::from(130)
    } else if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One measured run, bracketed by metric scrapes and CPU readings.
async fn measure<F, Fut>(
    generator: &Generator,
    metrics_urls: &[String],
    pids: &[String],
    mode: &'static str,
    clients: Option<usize>,
    rate: Option<f64>,
    load: F,
) -> Run
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Measured>,
{
    let before = scrape(&generator.client, metrics_urls).await;
    let server_before = cpu(pids);
    let switches_before = switches(pids);
    let own_before = server::cpu_time("self");
    let measured = load().await;
    let ended = Instant::now();
    let own_after = server::cpu_time("self");
    let server_after = cpu(pids);
    let switches_after = switches(pids);
    let asked = ended.elapsed();
    let after = scrape(&generator.client, metrics_urls).await;

    let mut run = Run::new(mode, clients, rate, &measured);
    let t = &measured.tally;
    if let (Some(before), Some(after)) = (&before, &after) {
        let gauges = gauges_read_after(&generator.client, metrics_urls, after, ended, asked).await;
        let figures = server::figures(before, after, &gauges, t.ok() + t.mismatched, measured.elapsed);
        run.server = figures.values;
        run.servers_restarted = figures.restarted.iter().map(|&i| metrics_urls[i].clone()).collect();
        for url in &run.servers_restarted {
            eprintln!(
                "sagahost bench: warning: {url} restarted during the run (or another process answered its \
                 /metrics: give each replica's own --metrics-url); its figures count from the restart"
            );
        }
    }
    if let (Some(b), Some(a)) = (server_before, server_after) {
        if t.ok() > 0 {
            run.server_cpu_ms_per_saga = Some((a - b).as_secs_f64() * 1000.0 / t.ok() as f64);
        }
    }
    if let (Some(b), Some(a)) = (switches_before, switches_after) {
        if t.ok() > 0 {
            let per_saga = |n: u64| n as f64 / t.ok() as f64;
            // A group that appeared during the run counts whole; one whose threads ended, not.
            let by_thread: BTreeMap<String, f64> = a
                .iter()
                .map(|(group, &n)| (group.clone(), per_saga(n.saturating_sub(b.get(group).copied().unwrap_or(0)))))
                .filter(|&(_, n)| n > 0.0)
                .collect();
            run.server_context_switches_per_saga = Some(by_thread.values().sum());
            run.server_context_switches_by_thread = by_thread;
        }
    }
    run.server_file_huge_pages_mib = huge_pages(pids);
    if let (Some(b), Some(a)) = (own_before, own_after) {
        let cpu = (a - b).as_secs_f64();
        run.generator_cpu_s = Some(cpu);
        let sent = t.sent - t.dropped;
        if sent > 0 {
            run.generator_cpu_us_per_saga = Some(cpu * 1e6 / sent as f64);
        }
    }
    run
}

/// How long a run's end waits for scrapes whose database gauges were read after it.
const GAUGES_WAIT: Duration = Duration::from_secs(10);

/// Scrapes whose gauges read from the database (outbox backlog, lag) were read after the run
/// `ended`: `after` if they were, else scrapes taken again until they are. A host shares one
/// read of them between scrapes for 2 s or more, so right after a short run they could be
/// from before it. A host that does not say how old they are is taken as it is.
async fn gauges_read_after(
    client: &Client,
    urls: &[String],
    after: &[Scrape],
    ended: Instant,
    asked: Duration,
) -> Vec<Scrape> {
    // `asked`: the time from the run's end to the scrape being sent. A reading younger than
    // that was made after the end (the host reads at the earliest when the scrape arrives).
    let fresh = |scrapes: &[Scrape], asked: Duration| {
        scrapes.iter().all(|s| s.get(server::GAUGES_AGE).is_none_or(|age| age <= asked.as_secs_f64()))
    };
    let (mut gauges, mut asked) = (after.to_vec(), asked);
    while !fresh(&gauges, asked) {
        if ended.elapsed() > GAUGES_WAIT {
            eprintln!(
                "sagahost bench: warning: the database gauges (outbox backlog, lag) stayed older than the run's end \
                 for {GAUGES_WAIT:?}; reporting them as they are"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        asked = ended.elapsed();
        match scrape(client, urls).await {
            Some(again) => gauges = again,
            None => break,
        }
    }
    gauges
}

/// Every metrics URL scraped, one [`Scrape`] each in their order; `None` (with a warning) if
/// one cannot be read.
async fn scrape(client: &Client, urls: &[String]) -> Option<Vec<Scrape>> {
    let mut all = Vec::with_capacity(urls.len());
    for url in urls {
        match client.get_text(url, "/metrics", Duration::from_secs(10)).await {
            Ok((status, text)) if status.is_success() => all.push(Scrape::parse(&text)),
            Ok((status, _)) => {
                eprintln!("sagahost bench: warning: {url}/metrics answered {status}; no server figures");
                return None;
            }
            Err(e) => {
                eprintln!("sagahost bench: warning: {url}/metrics: {e}; no server figures");
                return None;
            }
        }
    }
    Some(all)
}

/// The summed CPU time of `pids`; `None` (with a warning) if one cannot be read.
fn cpu(pids: &[String]) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    for pid in pids {
        match server::cpu_time(pid) {
            Some(t) => total += t,
            None => {
                eprintln!("sagahost bench: warning: cannot read /proc/{pid}/stat; no server CPU figure");
                return None;
            }
        }
    }
    Some(total)
}

/// The context switches of `pids`' threads by thread group, summed over the processes; `None`
/// if one cannot be read (no warning: [`cpu`] gave it).
fn switches(pids: &[String]) -> Option<BTreeMap<String, u64>> {
    if pids.is_empty() {
        return None;
    }
    let mut all = BTreeMap::new();
    for pid in pids {
        for (group, n) in server::context_switches(pid)? {
            *all.entry(group).or_insert(0) += n;
        }
    }
    Some(all)
}

/// The summed MiB of `pids`' files mapped with huge pages; `None` if one cannot be read (no
/// warning: kernels without huge pages for files have no such lines, nothing to warn about).
fn huge_pages(pids: &[String]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|pid| server::file_huge_pages_kib(pid)).sum::<Option<u64>>().map(|kib| kib as f64 / 1024.0)
}

fn dedup(urls: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for u in urls {
        if !out.contains(u) {
            out.push(u.clone());
        }
    }
    out
}

/// The commit of the working directory, `-dirty` if tracked files changed; `None` outside a
/// checkout or without git.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git").args(args).stderr(std::process::Stdio::null()).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).filter(|c| !c.is_empty())?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{commit}-dirty") } else { commit })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn points(runs: &[Run]) -> Vec<chart::Point> {
    runs.iter()
        .filter_map(|r| {
            Some(chart::Point {
                offered: r.offered_rate?,
                achieved: r.throughput_per_s,
                p50_ms: r.latency_ms.map(|l| l.p50),
                p99_ms: r.latency_ms.map(|l| l.p99),
                failed_share: r.failed_share,
            })
        })
        .collect()
}

fn series_label(report: &Report) -> String {
    report.label.clone().unwrap_or_else(|| report.parameters.urls.join(", "))
}

fn chart_title(report: &Report) -> String {
    let commit = report.git_commit.as_deref().map(|c| format!(", {c}")).unwrap_or_default();
    format!("sagahost bench: {} sweep, mix {}{commit}", report.parameters.saga, report.parameters.mix)
}

/// Draws `chart` from saved JSON reports, one series per file.
fn plot(files: &[PathBuf], chart: &Path, title: Option<&str>) -> Result<(), String> {
    let mut series = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{} is not a bench report: {e}", file.display()))?;
        let label = doc["label"].as_str().map(str::to_owned).unwrap_or_else(|| {
            file.file_stem().map_or_else(|| file.display().to_string(), |s| s.to_string_lossy().into_owned())
        });
        let points: Vec<chart::Point> = doc["runs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|r| {
                Some(chart::Point {
                    offered: r["offered_rate"].as_f64()?,
                    achieved: r["throughput_per_s"].as_f64()?,
                    p50_ms: r["latency_ms"]["p50"].as_f64(),
                    p99_ms: r["latency_ms"]["p99"].as_f64(),
                    // Reports from before `failed_share` have the counts it is made of.
                    failed_share: r["failed_share"].as_f64().unwrap_or_else(|| {
                        let (ok, failed) = (r["ok"].as_f64().unwrap_or(0.0), r["failed"].as_f64().unwrap_or(0.0));
                        if ok + failed > 0.0 {
                            failed / (ok + failed)
                        } else {
                            0.0
                        }
                    }),
                })
            })
            .collect();
        if points.is_empty() {
            return Err(format!("{} holds no open-loop runs to draw; was it a sweep?", file.display()));
        }
        series.push(chart::Series { label, points });
    }
    chart::render(chart, title.unwrap_or("sagahost bench: sweep"), &series)
}
