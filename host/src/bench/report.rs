//! The results: one JSON document (`--json`, `--output json`) and the human summary.
//!
//! The JSON carries every figure with the parameters that produced it, the sagahost version
//! and the commit, so a file in a results directory says what it measured without the command
//! line. Its shape: `{tool, sagahost_version, git_commit, label, started_at, parameters,
//! warmup, runs: [...], interrupted}`, one entry in `runs` per measured run (one per rate of
//! a sweep).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::load::Measured;
use super::mix::Trigger;

/// The whole document.
#[derive(Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub sagahost_version: &'static str,
    /// The commit the tool was run from (`--commit`, `SAGAHOST_GIT_COMMIT`, or `git` in the
    /// working directory; `-dirty` when tracked files had changes), if known.
    pub git_commit: Option<String>,
    pub label: Option<String>,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub parameters: Parameters,
    pub warmup: Option<Warmup>,
    pub runs: Vec<Run>,
    /// Stopped by Ctrl-C: the last run is partial, later ones are missing.
    pub interrupted: bool,
}

/// The command line, resolved.
#[derive(Serialize)]
pub struct Parameters {
    /// `closed`, `open` or `sweep`.
    pub mode: &'static str,
    pub urls: Vec<String>,
    pub metrics_urls: Vec<String>,
    pub saga: String,
    pub path: String,
    pub mix: String,
    pub seed: u64,
    pub clients: usize,
    pub sagas: Option<u64>,
    pub duration_s: Option<f64>,
    pub rates: Vec<f64>,
    pub max_in_flight: usize,
    pub warmup: u64,
    pub wait_s: u64,
    pub timeout_s: u64,
    pub pids: Vec<u32>,
}

/// The warm-up sagas (not measured): how many ended as expected.
#[derive(Serialize)]
pub struct Warmup {
    pub sagas: u64,
    pub ok: u64,
    pub failed: u64,
}

/// Percentiles of a latency histogram recorded in microseconds, in milliseconds.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Percentiles {
            count: h.len(),
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }
}

/// One trigger's share of a run.
#[derive(Serialize)]
pub struct TriggerRun {
    pub expected_status: &'static str,
    pub sent: u64,
    pub as_expected: u64,
    pub latency_ms: Option<Percentiles>,
}

/// One measured run.
#[derive(Serialize)]
pub struct Run {
    /// `closed` or `open`.
    pub mode: &'static str,
    pub clients: Option<usize>,
    /// Open loop: the offered rate, sagas per second.
    pub offered_rate: Option<f64>,
    /// From the first send to the end of the last saga.
    pub elapsed_s: f64,
    pub sent: u64,
    /// Ended COMPLETED, as their trigger says.
    pub completed: u64,
    /// Ended CANCELLED, as their trigger says.
    pub compensated: u64,
    /// completed + compensated.
    pub ok: u64,
    /// Everything that did not end as expected: the sum of the five counts below it.
    pub failed: u64,
    pub mismatched: u64,
    pub unsettled: u64,
    /// By HTTP status.
    pub http_errors: BTreeMap<String, u64>,
    pub transport_errors: u64,
    pub dropped: u64,
    /// failed / (ok + failed): the share of the sends that came to an end that failed.
    pub failed_share: f64,
    /// In flight when Ctrl-C stopped the run: neither ok nor failed.
    pub abandoned: u64,
    /// Sagas whose POST answered before they were final, followed by polling their Location.
    pub polled: u64,
    /// The GET requests of that polling (load the generator added).
    pub poll_requests: u64,
    /// ok / the time from the first send to the last saga that ended as expected (at least
    /// the open loop's send window): a saga hung until its timeout is a failure, not a
    /// stretch of the run.
    pub throughput_per_s: f64,
    /// Of the sagas that ended as expected; open loop: from their scheduled send time.
    pub latency_ms: Option<Percentiles>,
    /// Of every saga sent that came to an end, failures included (each at the time it took to
    /// fail, an unsettled one at the timeout; dropped sends were never sent and are not in
    /// it). Where sends failed fast, `latency_ms` alone reads healthier than the service was.
    pub latency_all_ms: Option<Percentiles>,
    /// Open loop: how late the generator sent after the scheduled time.
    pub send_lag_ms: Option<Percentiles>,
    pub by_trigger: BTreeMap<&'static str, TriggerRun>,
    /// Figures from the servers' /metrics, summed over `metrics_urls` (see `server::FIGURES`).
    pub server: BTreeMap<&'static str, f64>,
    /// Metrics URLs whose process started over during the run (or another process answered:
    /// scrapes through a load balancer): their counters count from the restart, so the figures
    /// miss what those replicas did before it.
    pub servers_restarted: Vec<String>,
    /// CPU time (user + system) of the `--pid` processes per saga that ended as expected.
    pub server_cpu_ms_per_saga: Option<f64>,
    /// Context switches of the `--pid` processes' threads per saga that ended as expected, and
    /// the same by thread group (a pool's threads together: `server::context_switches`).
    pub server_context_switches_per_saga: Option<f64>,
    pub server_context_switches_by_thread: BTreeMap<String, f64>,
    /// MiB of the `--pid` processes' files (their code, mostly) mapped with huge pages at the
    /// end of the run (README, "Running it"): 0 for a binary run from an ordinary disk.
    pub server_file_huge_pages_mib: Option<f64>,
    /// The generator's own CPU time over the run, and per saga sent.
    pub generator_cpu_s: Option<f64>,
    pub generator_cpu_us_per_saga: Option<f64>,
    /// The first few failures, described.
    pub error_samples: Vec<String>,
    pub interrupted: bool,
}

impl Run {
    /// The run's figures from what was measured; server and CPU figures are filled in later.
    pub fn new(mode: &'static str, clients: Option<usize>, offered_rate: Option<f64>, m: &Measured) -> Run {
        let t = &m.tally;
        let elapsed = m.elapsed.as_secs_f64();
        Run {
            mode,
            clients,
            offered_rate,
            elapsed_s: elapsed,
            sent: t.sent,
            completed: t.completed,
            compensated: t.compensated,
            ok: t.ok(),
            failed: t.failed(),
            mismatched: t.mismatched,
            unsettled: t.unsettled,
            http_errors: t.http_errors.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
            transport_errors: t.transport_errors,
            dropped: t.dropped,
            failed_share: t.failed_share(),
            abandoned: t.abandoned,
            polled: t.polled,
            poll_requests: t.polls,
            throughput_per_s: {
                let ok_elapsed = m.ok_elapsed.as_secs_f64();
                if ok_elapsed > 0.0 {
                    t.ok() as f64 / ok_elapsed
                } else {
                    0.0
                }
            },
            latency_ms: Percentiles::of(&t.latency),
            latency_all_ms: Percentiles::of(&t.latency_all),
            send_lag_ms: m.send_lag.as_ref().and_then(Percentiles::of),
            by_trigger: t
                .triggers
                .iter()
                .map(|(trigger, tt): (&Trigger, _)| {
                    (
                        trigger.name(),
                        TriggerRun {
                            expected_status: trigger.expected().status(),
                            sent: tt.sent,
                            as_expected: tt.as_expected,
                            latency_ms: Percentiles::of(&tt.latency),
                        },
                    )
                })
                .collect(),
            server: BTreeMap::new(),
            servers_restarted: Vec::new(),
            server_cpu_ms_per_saga: None,
            server_context_switches_per_saga: None,
            server_context_switches_by_thread: BTreeMap::new(),
            server_file_huge_pages_mib: None,
            generator_cpu_s: None,
            generator_cpu_us_per_saga: None,
            error_samples: t.samples.clone(),
            interrupted: false,
        }
    }

    /// The human summary of this run, several lines.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let head = match (self.mode, self.clients, self.offered_rate) {
            ("open", _, Some(rate)) => format!("open loop at {rate} sagas/s"),
            (_, Some(clients), _) => format!("closed loop, {clients} clients"),
            (mode, ..) => mode.to_owned(),
        };
        let _ =
            writeln!(s, "{head}: {} sagas sent in {:.2} s{}", self.sent, self.elapsed_s, interrupted(self.interrupted));
        let http: u64 = self.http_errors.values().sum();
        let _ = writeln!(
            s,
            "  outcomes    {} completed, {} compensated as expected; {} failed ({} mismatched, {} unsettled, {} HTTP errors{}, {} transport errors, {} dropped){}{}",
            self.completed,
            self.compensated,
            self.failed,
            self.mismatched,
            self.unsettled,
            http,
            if self.http_errors.is_empty() {
                String::new()
            } else {
                format!(
                    " [{}]",
                    self.http_errors.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
                )
            },
            self.transport_errors,
            self.dropped,
            if self.abandoned > 0 { format!(", {} abandoned", self.abandoned) } else { String::new() },
            if self.polled > 0 {
                format!("; {} polled after the POST answered ({} GETs)", self.polled, self.poll_requests)
            } else {
                String::new()
            },
        );
        let _ = writeln!(s, "  throughput  {:.1} sagas/s", self.throughput_per_s);
        let from = if self.mode == "open" { ", from the scheduled send" } else { "" };
        let line = |s: &mut String, l: &Percentiles, of: &str| {
            let _ = writeln!(
                s,
                "  latency ms  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}  ({of}{from})",
                l.p50, l.p90, l.p99, l.p99_9, l.max, l.mean
            );
        };
        if let Some(l) = &self.latency_ms {
            line(&mut s, l, "successes");
        }
        if self.failed > 0 {
            if let Some(l) = &self.latency_all_ms {
                line(&mut s, l, "every answered send, failures included");
            }
        }
        if self.failed_share >= FAILED_SHARE_SHOWN {
            let _ = writeln!(
                s,
                "  warning     {:.1}% of the sends failed: the latency of the successes alone does not describe this run",
                self.failed_share * 100.0
            );
        }
        if let Some(lag) = &self.send_lag_ms {
            let _ = writeln!(
                s,
                "  send lag ms p50 {:.2}  p99 {:.2}  max {:.2} (the generator behind its schedule)",
                lag.p50, lag.p99, lag.max
            );
        }
        if !self.server.is_empty() || self.server_cpu_ms_per_saga.is_some() {
            let mut parts: Vec<String> = super::server::FIGURES
                .iter()
                .filter_map(|f| self.server.get(f.key).map(|v| format!("{} {}", f.label, number(*v))))
                .collect();
            if let Some(cpu) = self.server_cpu_ms_per_saga {
                parts.push(format!("CPU {cpu:.2} ms per saga"));
            }
            if let Some(switches) = self.server_context_switches_per_saga {
                let mut busiest: Vec<(&String, &f64)> = self.server_context_switches_by_thread.iter().collect();
                busiest.sort_by(|a, b| b.1.total_cmp(a.1));
                let top: Vec<String> = busiest.iter().take(4).map(|(group, n)| format!("{group} {n:.1}")).collect();
                parts.push(format!("context switches {switches:.1} per saga ({})", top.join(", ")));
            }
            if let Some(mib) = self.server_file_huge_pages_mib {
                parts.push(format!("code on huge pages {mib:.0} MiB"));
            }
            let _ = writeln!(s, "  server      {}", parts.join("; "));
        }
        if let Some(cpu) = self.generator_cpu_s {
            let per = self.generator_cpu_us_per_saga.map(|u| format!(", {u:.0} µs per saga")).unwrap_or_default();
            let _ = writeln!(s, "  generator   CPU {cpu:.2} s{per}");
        }
        s
    }
}

/// The failed share from which a run's summary warns and its point on a sweep chart is marked:
/// 1% of sends failing is an outage for the clients behind them, whatever the successes'
/// latency.
pub const FAILED_SHARE_SHOWN: f64 = 0.01;

fn interrupted(yes: bool) -> &'static str {
    if yes {
        " (interrupted)"
    } else {
        ""
    }
}

/// A figure with as many decimals as it deserves.
fn number(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The sweep as a table, one line per offered rate.
pub fn sweep_table(runs: &[Run]) -> String {
    let mut s = String::from(
        "  offered/s  achieved/s       ok   failed   p50 ms   p99 ms   max ms  (latency of successes; p99 of all sends)\n",
    );
    for r in runs {
        let l = r.latency_ms;
        let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        let _ = write!(
            s,
            "  {:>9} {:>11.1} {:>8} {:>8} {:>8} {:>8} {:>8}",
            r.offered_rate.map_or_else(|| "-".to_owned(), |r| format!("{r}")),
            r.throughput_per_s,
            r.ok,
            r.failed,
            f(l.map(|l| l.p50)),
            f(l.map(|l| l.p99)),
            f(l.map(|l| l.max)),
        );
        if r.failed > 0 {
            let _ =
                write!(s, "  {:.1}% failed; p99 of all {}", r.failed_share * 100.0, f(r.latency_all_ms.map(|l| l.p99)));
        }
        s.push('\n');
    }
    s
}
