//! What the server says about a run: its `/metrics` scraped before and after, turned into
//! means and rates, and the CPU time of local processes read from `/proc`.
//!
//! The figures are a table ([`FIGURES`]): each names an OpenMetrics sample and how to turn
//! its change over the run into one number. A new family (a relay throughput, a cache hit
//! rate) is one more row; a family the server does not export is left out of the report, so
//! the generator works against older and newer hosts alike.

use std::collections::BTreeMap;
use std::time::Duration;

/// Every sample of one scrape, summed over its label sets: `name` -> value; and summed per label
/// too: `name|label="value"` -> value (the sum over the label sets with that label). Histograms
/// appear as their `_sum` and `_count` samples, counters as `_total`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    /// Parses OpenMetrics (or Prometheus) text. Lines it cannot read are skipped: a figure
    /// whose samples are missing is left out, not guessed.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (name, labels, rest) = match line.find(['{', ' ']) {
                Some(i) if line.as_bytes()[i] == b'{' => match line.rfind('}') {
                    Some(end) => (&line[..i], &line[i + 1..end], &line[end + 1..]),
                    None => continue,
                },
                Some(i) => (&line[..i], "", &line[i..]),
                None => continue,
            };
            let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) else { continue };
            if value.is_finite() {
                *samples.entry(name.to_owned()).or_insert(0.0) += value;
                for pair in label_pairs(labels) {
                    *samples.entry(format!("{name}|{pair}")).or_insert(0.0) += value;
                }
            }
        }
        Scrape(samples)
    }

    /// Adds another replica's scrape to this one: its counters and its own gauges add up;
    /// a gauge every replica reads from the one shared database ([`SHARED_GAUGES`]) is the
    /// same figure seen again, so the larger reading counts, not the sum (three replicas
    /// reported three times the outbox backlog).
    pub fn add(&mut self, other: &Scrape) {
        for (name, value) in &other.0 {
            let shared = SHARED_GAUGES.iter().any(|g| name.split('|').next() == Some(*g));
            let sum = self.0.entry(name.clone()).or_insert(0.0);
            *sum = if shared { sum.max(*value) } else { *sum + value };
        }
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    /// Whether the process behind `after` started over since `before` (or is another process:
    /// a load balancer sent the scrapes to different replicas). Its start time says so; a host
    /// too old to export it, a counter that went down.
    fn restarted(before: &Scrape, after: &Scrape) -> bool {
        match (before.get(START_TIME), after.get(START_TIME)) {
            (Some(b), Some(a)) => a != b,
            _ => after.0.iter().any(|(name, a)| {
                let base = name.split('|').next().unwrap_or(name);
                (base.ends_with("_total") || base.ends_with("_count")) && before.get(name).is_some_and(|b| *a < b)
            }),
        }
    }
}

/// The sample saying when a host process started (Unix seconds).
const START_TIME: &str = "sagahost_start_time_seconds";

/// The sample saying how old a scrape's outbox gauges (backlog, lag) read from the database
/// are, in seconds.
pub const GAUGES_AGE: &str = "sagahost_store_gauges_age_seconds|gauge=\"outbox\"";

/// The increase of every sample of one replica's scrapes over a run; all of `after` when
/// the replica restarted in between (its counters started over from zero, as Prometheus's
/// `increase()` reads a counter reset: what it did before the restart is lost, not negative).
fn increase(before: &Scrape, after: &Scrape, restarted: bool) -> Scrape {
    Scrape(
        after
            .0
            .iter()
            .map(|(name, a)| (name.clone(), if restarted { *a } else { a - before.get(name).unwrap_or(0.0) }))
            .collect(),
    )
}

/// Gauges a host reads from the database, which every replica shares: each replica's scrape
/// shows the same figure.
const SHARED_GAUGES: [&str; 3] = ["sagahost_outbox_pending_events", "sagahost_outbox_lag_seconds", "sagahost_sagas"];

/// The `key="value"` pairs of a label set as written, split at the commas between pairs (a
/// quoted value may hold commas and escaped quotes).
fn label_pairs(labels: &str) -> Vec<&str> {
    let mut pairs = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                pairs.push(labels[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    pairs.push(labels[start..].trim());
    pairs.retain(|p| !p.is_empty());
    pairs
}

/// How one figure is computed from the scrapes around a run.
pub enum Kind {
    /// Mean of a histogram over the run (`_sum` delta / `_count` delta), times `scale`.
    HistogramMean { family: &'static str, scale: f64 },
    /// [`Kind::HistogramMean`] over the label sets with one label, e.g. `phase="run"`.
    LabelledMean { family: &'static str, label: &'static str, scale: f64 },
    /// A sample's increase per saga settled in the run.
    PerSaga { sample: &'static str },
    /// A sample's increase per second of the run.
    PerSecond { sample: &'static str },
    /// A sample's increase over the run.
    Increase { sample: &'static str },
    /// A sample's value at the end of the run (a gauge).
    AtEnd { sample: &'static str },
}

/// A figure of the server's, reported under `key` when its samples are present.
pub struct Figure {
    pub key: &'static str,
    /// A short description for the human summary.
    pub label: &'static str,
    pub kind: Kind,
}

/// The server figures the generator reports. Add a row for a new metric family.
pub const FIGURES: &[Figure] = &[
    Figure {
        key: "plugin_call_mean_us",
        label: "plugin call mean µs",
        kind: Kind::HistogramMean { family: "sagahost_plugin_call_seconds", scale: 1e6 },
    },
    Figure {
        key: "plugin_call_setup_mean_us",
        label: "plugin call setup mean µs",
        kind: Kind::LabelledMean { family: "sagahost_plugin_call_phase_seconds", label: "phase=\"setup\"", scale: 1e6 },
    },
    Figure {
        key: "plugin_call_instantiate_mean_us",
        label: "plugin call instantiate mean µs",
        kind: Kind::LabelledMean {
            family: "sagahost_plugin_call_phase_seconds",
            label: "phase=\"instantiate\"",
            scale: 1e6,
        },
    },
    Figure {
        key: "plugin_call_run_mean_us",
        label: "plugin call run mean µs",
        kind: Kind::LabelledMean { family: "sagahost_plugin_call_phase_seconds", label: "phase=\"run\"", scale: 1e6 },
    },
    Figure {
        key: "plugin_call_collect_mean_us",
        label: "plugin call collect mean µs",
        kind: Kind::LabelledMean {
            family: "sagahost_plugin_call_phase_seconds",
            label: "phase=\"collect\"",
            scale: 1e6,
        },
    },
    Figure {
        key: "plugin_call_release_mean_us",
        label: "sandbox release after the call mean µs",
        kind: Kind::LabelledMean {
            family: "sagahost_plugin_call_phase_seconds",
            label: "phase=\"release\"",
            scale: 1e6,
        },
    },
    Figure {
        key: "plugin_call_spare_mean_us",
        label: "spare instance made ahead of a call mean µs",
        kind: Kind::LabelledMean { family: "sagahost_plugin_call_phase_seconds", label: "phase=\"spare\"", scale: 1e6 },
    },
    Figure {
        key: "plugin_call_spare_misses_per_saga",
        label: "plugin calls that found no spare instance per saga",
        kind: Kind::PerSaga { sample: "sagahost_plugin_call_spares_total|result=\"missed\"" },
    },
    Figure {
        key: "plugin_call_cpu_mean_us",
        label: "plugin call CPU mean µs",
        kind: Kind::HistogramMean { family: "sagahost_plugin_call_cpu_seconds", scale: 1e6 },
    },
    Figure {
        key: "plugin_execute_mean_us",
        label: "execute call mean µs",
        kind: Kind::LabelledMean { family: "sagahost_plugin_call_seconds", label: "call=\"execute\"", scale: 1e6 },
    },
    Figure {
        key: "plugin_compensate_mean_us",
        label: "compensate call mean µs",
        kind: Kind::LabelledMean { family: "sagahost_plugin_call_seconds", label: "call=\"compensate\"", scale: 1e6 },
    },
    Figure {
        key: "host_per_transition_mean_us",
        label: "host time per transition mean µs",
        kind: Kind::HistogramMean { family: "sagahost_transition_overhead_seconds", scale: 1e6 },
    },
    Figure {
        key: "transitions_per_saga",
        label: "transitions per saga",
        kind: Kind::PerSaga { sample: "sagahost_transition_overhead_seconds_count" },
    },
    Figure {
        key: "driver_commit_mean_us",
        label: "driver commit mean µs",
        kind: Kind::HistogramMean { family: "sagahost_driver_commit_seconds", scale: 1e6 },
    },
    Figure {
        key: "driver_commits_per_saga",
        label: "driver commits per saga",
        kind: Kind::PerSaga { sample: "sagahost_driver_commit_seconds_count" },
    },
    Figure {
        key: "store_writes_per_saga",
        label: "store writes per saga",
        kind: Kind::PerSaga { sample: "sagahost_store_writes_total" },
    },
    Figure {
        key: "store_write_transactions_per_saga",
        label: "store write transactions per saga",
        kind: Kind::PerSaga { sample: "sagahost_store_write_transactions_total" },
    },
    Figure {
        key: "plugin_calls_per_saga",
        label: "plugin calls per saga",
        kind: Kind::PerSaga { sample: "sagahost_plugin_calls_total" },
    },
    Figure {
        key: "state_reads_from_cache_per_saga",
        label: "state reads per saga from the cache",
        kind: Kind::PerSaga { sample: "sagahost_state_reads_total|answered_by=\"cache\"" },
    },
    Figure {
        key: "state_reads_from_filter_per_saga",
        label: "from the key filter",
        kind: Kind::PerSaga { sample: "sagahost_state_reads_total|answered_by=\"filter\"" },
    },
    Figure {
        key: "state_reads_from_database_per_saga",
        label: "from the database",
        kind: Kind::PerSaga { sample: "sagahost_state_reads_total|answered_by=\"database\"" },
    },
    Figure {
        key: "state_checks_refused_per_saga",
        label: "commits refused for a stale state read, per saga",
        kind: Kind::PerSaga { sample: "sagahost_state_checks_refused_total" },
    },
    Figure {
        key: "catalog_checks_refused_per_saga",
        label: "commits refused for a stale catalog, per saga",
        kind: Kind::PerSaga { sample: "sagahost_catalog_checks_refused_total" },
    },
    Figure {
        key: "events_published_per_s",
        label: "events published per s",
        kind: Kind::PerSecond { sample: "sagahost_events_published_total" },
    },
    Figure {
        key: "relay_read_mean_ms",
        label: "relay batch: read mean ms",
        kind: Kind::LabelledMean { family: "sagahost_relay_phase_seconds", label: "phase=\"read\"", scale: 1e3 },
    },
    Figure {
        key: "relay_publish_mean_ms",
        label: "publish mean ms",
        kind: Kind::LabelledMean { family: "sagahost_relay_phase_seconds", label: "phase=\"publish\"", scale: 1e3 },
    },
    Figure {
        key: "relay_mark_mean_ms",
        label: "mark mean ms",
        kind: Kind::LabelledMean { family: "sagahost_relay_phase_seconds", label: "phase=\"mark\"", scale: 1e3 },
    },
    Figure {
        key: "relay_batches_per_s",
        label: "relay batches published per s",
        kind: Kind::PerSecond { sample: "sagahost_relay_phase_seconds_count|phase=\"publish\"" },
    },
    Figure {
        key: "relay_failures",
        label: "relay failures",
        kind: Kind::Increase { sample: "sagahost_relay_failures_total" },
    },
    Figure {
        key: "stale_commits",
        label: "stale commits",
        kind: Kind::Increase { sample: "sagahost_stale_commits_total" },
    },
    Figure {
        key: "outbox_pending_at_end",
        label: "outbox events pending at the end",
        kind: Kind::AtEnd { sample: "sagahost_outbox_pending_events" },
    },
    Figure {
        key: "outbox_lag_s_at_end",
        label: "relay lag at the end (oldest pending event), s",
        kind: Kind::AtEnd { sample: "sagahost_outbox_lag_seconds" },
    },
];

/// The server's figures for one run.
#[derive(Debug, Default)]
pub struct Figures {
    /// The figures of [`FIGURES`] whose samples the scrapes hold, by key.
    pub values: BTreeMap<&'static str, f64>,
    /// The replicas (indexes into the scrapes) that restarted during the run.
    pub restarted: Vec<usize>,
}

/// The figures of [`FIGURES`] from one scrape per replica before and after a run, in the same
/// order (each replica's own increase, summed: a replica that restarted counts from its
/// restart rather than making a sum go down), and the gauges at the end from `gauges` (a
/// scrape whose database gauges were read after the run ended, see [`GAUGES_AGE`]).
pub fn figures(before: &[Scrape], after: &[Scrape], gauges: &[Scrape], sagas: u64, elapsed: Duration) -> Figures {
    let mut restarted = Vec::new();
    let mut increases = Scrape::default();
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        let again = Scrape::restarted(b, a);
        if again {
            restarted.push(i);
        }
        // Increases add up over replicas, even of the samples that are the same shared
        // figure: only counters and histograms are read from here.
        for (name, value) in increase(b, a, again).0 {
            *increases.0.entry(name).or_insert(0.0) += value;
        }
    }
    let mut at_end = Scrape::default();
    for g in gauges {
        at_end.add(g);
    }
    let mut values = BTreeMap::new();
    for f in FIGURES {
        let value = match f.kind {
            Kind::HistogramMean { family, scale } => mean(&increases, family, "", scale),
            Kind::LabelledMean { family, label, scale } => mean(&increases, family, &format!("|{label}"), scale),
            Kind::PerSaga { sample } => increases.get(sample).filter(|_| sagas > 0).map(|d| d / sagas as f64),
            Kind::PerSecond { sample } => {
                increases.get(sample).filter(|_| !elapsed.is_zero()).map(|d| d / elapsed.as_secs_f64())
            }
            Kind::Increase { sample } => increases.get(sample),
            Kind::AtEnd { sample } => at_end.get(sample),
        };
        if let Some(v) = value {
            values.insert(f.key, v);
        }
    }
    Figures { values, restarted }
}

/// A histogram's mean over the run (`_sum` increase / `_count` increase), times `scale`; `suffix`
/// picks a label's sums (`|label="value"`, see [`Scrape`]) or, empty, all of them.
fn mean(increases: &Scrape, family: &str, suffix: &str, scale: f64) -> Option<f64> {
    let sum = increases.get(&format!("{family}_sum{suffix}"))?;
    let count = increases.get(&format!("{family}_count{suffix}"))?;
    (count > 0.0).then(|| sum / count * scale)
}

/// Linux's `USER_HZ`: the unit of the CPU times in `/proc/PID/stat`. It is 100 on every
/// architecture Linux runs on in practice, and reading it (`sysconf`) would need `unsafe`.
const USER_HZ: f64 = 100.0;

/// CPU time (user + system, all threads) of a process so far, from `/proc/{pid}/stat`;
/// `None` where there is no `/proc` or no such process.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// KiB of a process's file mappings backed by huge pages (its code, when the binary sits on a
/// tmpfs mounted with huge pages or the kernel maps read-only files so), from
/// `/proc/{pid}/smaps_rollup`; `None` where there is no such file or neither line.
pub fn file_huge_pages_kib(pid: &str) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_huge_file_pages(&rollup)
}

/// `ShmemPmdMapped` plus `FilePmdMapped` of an `smaps_rollup`, in KiB.
fn parse_huge_file_pages(rollup: &str) -> Option<u64> {
    let mut found = None;
    for line in rollup.lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        if matches!(name, "ShmemPmdMapped" | "FilePmdMapped") {
            let kib: u64 = value.trim().strip_suffix("kB")?.trim().parse().ok()?;
            found = Some(found.unwrap_or(0) + kib);
        }
    }
    found
}

/// Context switches (voluntary and involuntary) of each thread of a process so far, summed by
/// thread group ([`thread_group`]), from `/proc/{pid}/task/*/{comm,status}`; `None` where there
/// is no `/proc` or no such process. A thread that ended before the read is missing from it.
/// At low rates a saga's time goes mostly to threads waking each other (a statement's round
/// trip to SQLite's connection thread, a commit's answer), so the switches per saga, and whose
/// they are, say where to look.
pub fn context_switches(pid: &str) -> Option<BTreeMap<String, u64>> {
    let mut groups = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let path = task.path();
        // A thread may end between the listing and the reads: skipped.
        let (Ok(comm), Ok(status)) =
            (std::fs::read_to_string(path.join("comm")), std::fs::read_to_string(path.join("status")))
        else {
            continue;
        };
        if let Some(n) = parse_switches(&status) {
            *groups.entry(thread_group(comm.trim()).to_owned()).or_insert(0) += n;
        }
    }
    Some(groups)
}

/// The sum of `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of a
/// `/proc/PID/task/TID/status` file.
fn parse_switches(status: &str) -> Option<u64> {
    let field = |name: &str| {
        status.lines().find_map(|line| line.strip_prefix(name)?.trim_start_matches(':').trim().parse::<u64>().ok())
    };
    Some(field("voluntary_ctxt_switches")? + field("nonvoluntary_ctxt_switches")?)
}

/// A thread's name without a pool's numbering (`tokio-runtime-worker-3`, `pool-12`): the
/// threads of one pool count together. (Linux keeps 15 bytes of a name: `sqlx-sqlite-wor`.)
fn thread_group(comm: &str) -> &str {
    match comm.rsplit_once('-') {
        Some((group, n)) if !group.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => group,
        _ => comm,
    }
}

/// utime and stime of a `/proc/PID/stat` line. The command name (field 2) is in parentheses
/// and may hold spaces and parentheses itself, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<Duration> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name: state (field 3) ... utime is field 14 and stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / USER_HZ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP sagahost_plugin_call_seconds x\n\
        # TYPE sagahost_plugin_call_seconds histogram\n\
        sagahost_plugin_call_seconds_sum{saga_type=\"order\",step=\"a b\",call=\"execute\",outcome=\"done\"} 0.5\n\
        sagahost_plugin_call_seconds_count{saga_type=\"order\",step=\"a\",call=\"execute\",outcome=\"done\"} 1000\n\
        sagahost_plugin_call_seconds_sum{saga_type=\"order\",step=\"b\",call=\"execute\",outcome=\"done\"} 0.5\n\
        sagahost_plugin_call_seconds_count{saga_type=\"order\",step=\"b\",call=\"execute\",outcome=\"done\"} 1000\n\
        sagahost_events_published_total 10\n\
        sagahost_outbox_pending_events 7\n\
        sagahost_state_reads_total{answered_by=\"cache\"} 5\n\
        sagahost_state_reads_total{answered_by=\"database\"} 20\n\
        # EOF\n";

    const AFTER: &str = "sagahost_plugin_call_seconds_sum{step=\"a b\"} 1.0\n\
        sagahost_plugin_call_seconds_count{step=\"a\"} 1500\n\
        sagahost_plugin_call_seconds_sum{step=\"b\"} 1.0\n\
        sagahost_plugin_call_seconds_count{step=\"b\"} 1500\n\
        sagahost_events_published_total 510\n\
        sagahost_outbox_pending_events 3\n\
        sagahost_plugin_call_seconds_sum{step=\"c\",call=\"compensate\"} 0.2\n\
        sagahost_plugin_call_seconds_count{step=\"c\",call=\"compensate\"} 100\n\
        sagahost_state_reads_total{answered_by=\"cache\"} 255\n\
        sagahost_state_reads_total{answered_by=\"database\"} 30\n\
        garbage line\n\
        # EOF\n";

    #[test]
    fn samples_are_also_summed_per_label_and_quoted_commas_do_not_split_pairs() {
        let text =
            "m_sum{phase=\"run\",step=\"a,\\\"b\"} 2\nm_sum{phase=\"run\",step=\"c\"} 3\nm_sum{phase=\"setup\"} 1\n";
        let s = Scrape::parse(text);
        assert_eq!(s.get("m_sum"), Some(6.0));
        assert_eq!(s.get("m_sum|phase=\"run\""), Some(5.0));
        assert_eq!(s.get("m_sum|step=\"a,\\\"b\""), Some(2.0));
        assert_eq!(s.get("m_sum|phase=\"setup\""), Some(1.0));
        assert_eq!(label_pairs(""), Vec::<&str>::new());
    }

    #[test]
    fn replicas_add_their_own_figures_but_not_the_shared_databases_twice() {
        let one = Scrape::parse(
            "sagahost_outbox_pending_events 10\nsagahost_outbox_lag_seconds 2\n\
             sagahost_sagas{saga_type=\"order\",status=\"COMPLETED\"} 5\nsagahost_events_published_total 7\n",
        );
        let other = Scrape::parse("sagahost_outbox_pending_events 12\nsagahost_events_published_total 3\n");
        let mut all = one.clone();
        all.add(&other);
        all.add(&one);
        assert_eq!(all.get("sagahost_outbox_pending_events"), Some(12.0));
        assert_eq!(all.get("sagahost_outbox_lag_seconds"), Some(2.0));
        assert_eq!(all.get("sagahost_sagas|status=\"COMPLETED\""), Some(5.0));
        assert_eq!(all.get("sagahost_events_published_total"), Some(17.0), "a replica's own counter adds up");
    }

    #[test]
    fn samples_are_summed_over_label_sets() {
        let s = Scrape::parse(BEFORE);
        assert_eq!(s.get("sagahost_plugin_call_seconds_sum"), Some(1.0));
        assert_eq!(s.get("sagahost_plugin_call_seconds_count"), Some(2000.0));
        assert_eq!(s.get("sagahost_events_published_total"), Some(10.0));
        assert_eq!(s.get("sagahost_plugin_call_seconds"), None);
        let mut two = s.clone();
        two.add(&s);
        assert_eq!(two.get("sagahost_events_published_total"), Some(20.0));
    }

    #[test]
    fn figures_are_deltas_over_the_run_and_absent_families_are_left_out() {
        let (before, after) = (Scrape::parse(BEFORE), Scrape::parse(AFTER));
        let (before, after) = ([before], [after]);
        let figures = figures(&before, &after, &after, 100, Duration::from_secs(2));
        assert_eq!(figures.restarted, Vec::<usize>::new());
        let f = figures.values;
        // 1.2 s over 1,100 more calls (1,000 executes of 1 ms, 100 compensates of 2 ms).
        assert!((f["plugin_call_mean_us"] - 1200.0 / 1.1).abs() < 1e-6, "{f:?}");
        assert_eq!(f["events_published_per_s"], 250.0);
        assert_eq!(f["outbox_pending_at_end"], 3.0);
        // Labelled: the compensate calls alone, and reads per saga by what answered them.
        assert!((f["plugin_compensate_mean_us"] - 2000.0).abs() < 1e-6, "{f:?}");
        assert!(!f.contains_key("plugin_execute_mean_us"), "no call=\"execute\" label after the run");
        assert_eq!((f["state_reads_from_cache_per_saga"], f["state_reads_from_database_per_saga"]), (2.5, 0.1));
        assert!(!f.contains_key("state_reads_from_filter_per_saga"));
        assert!(!f.contains_key("host_per_transition_mean_us"), "no transition histogram in the scrape");
        assert!(!f.contains_key("stale_commits"));
        let none = super::figures(&before, &before, &before, 0, Duration::ZERO).values;
        assert!(!none.contains_key("plugin_call_mean_us"), "no calls, no mean");
    }

    /// Two replicas; the second restarts during the run. Its counters start over: its
    /// increase is what it did since (a plain difference of the sums went negative).
    #[test]
    fn a_replica_that_restarted_counts_from_its_restart_and_is_named() {
        let scrape = |start: f64, calls: f64, secs: f64| {
            Scrape::parse(&format!(
                "sagahost_start_time_seconds {start}\nsagahost_plugin_calls_total {calls}\n\
                 sagahost_plugin_call_seconds_sum {secs}\nsagahost_plugin_call_seconds_count {calls}\n"
            ))
        };
        let before = [scrape(1.0, 1000.0, 1.0), scrape(2.0, 5000.0, 5.0)];
        let after = [scrape(1.0, 1600.0, 1.6), scrape(9.0, 400.0, 0.8)];
        let f = figures(&before, &after, &after, 100, Duration::from_secs(1));
        assert_eq!(f.restarted, [1]);
        assert_eq!(f.values["plugin_calls_per_saga"], 10.0, "600 + 400 calls: {f:?}");
        // 0.6 s over 600 calls and 0.8 s over 400: 1.4 ms a call.
        assert!((f.values["plugin_call_mean_us"] - 1400.0).abs() < 1e-6, "{f:?}");

        // A host without a start time: a counter that went down says it.
        let old = |calls: f64| Scrape::parse(&format!("sagahost_plugin_calls_total {calls}\nsagahost_sagas 3\n"));
        let f = figures(&[old(100.0), old(100.0)], &[old(150.0), old(40.0)], &[], 10, Duration::from_secs(1));
        assert_eq!(f.restarted, [1]);
        assert_eq!(f.values["plugin_calls_per_saga"], 9.0, "50 + 40 calls");
        let g = |v: f64| Scrape::parse(&format!("sagahost_sagas {v}\n"));
        assert!(!Scrape::restarted(&g(5.0), &g(1.0)), "a gauge going down is no restart");
    }

    /// The gauges at the end come from their own scrape (taken once the database gauges were
    /// read after the run), the increases from the scrape right after the run.
    #[test]
    fn gauges_at_the_end_come_from_their_own_scrape() {
        let before = [Scrape::parse("sagahost_events_published_total 0\nsagahost_outbox_pending_events 0\n")];
        let after = [Scrape::parse("sagahost_events_published_total 100\nsagahost_outbox_pending_events 0\n")];
        let gauges = [Scrape::parse("sagahost_events_published_total 120\nsagahost_outbox_pending_events 42\n")];
        let f = figures(&before, &after, &gauges, 20, Duration::from_secs(1)).values;
        assert_eq!((f["events_published_per_s"], f["outbox_pending_at_end"]), (100.0, 42.0));
    }

    #[test]
    fn huge_file_pages_add_shmem_and_file_mappings() {
        let rollup = "55d0-7ffd ---p 00000000 00:00 0  [rollup]\nRss:  81234 kB\nAnonHugePages:  45056 kB\n\
            ShmemPmdMapped:    34816 kB\nFilePmdMapped:      2048 kB\nShared_Hugetlb:  0 kB\n";
        assert_eq!(parse_huge_file_pages(rollup), Some(36_864));
        assert_eq!(parse_huge_file_pages("ShmemPmdMapped: 0 kB\nFilePmdMapped: 0 kB\n"), Some(0));
        assert_eq!(parse_huge_file_pages("Rss: 5 kB\nAnonHugePages: 2048 kB\n"), None);
        assert_eq!(parse_huge_file_pages("ShmemPmdMapped: many kB\n"), None);
    }

    #[test]
    fn context_switches_are_summed_by_thread_pool() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(parse_switches(status), Some(15));
        assert_eq!(parse_switches("Name:\tx\nvoluntary_ctxt_switches:\t12\n"), None);
        assert_eq!(thread_group("tokio-runtime-worker-3"), "tokio-runtime-worker");
        assert_eq!(thread_group("sqlx-sqlite-wor"), "sqlx-sqlite-wor");
        assert_eq!(thread_group("pool-12"), "pool");
        assert_eq!(thread_group("-7"), "-7");
        assert_eq!(thread_group("epoch-"), "epoch-");
        // This test process has threads that have switched on Linux.
        if cfg!(target_os = "linux") {
            let own = context_switches("self").expect("/proc/self/task");
            assert!(own.values().sum::<u64>() > 0, "{own:?}");
        }
        assert_eq!(context_switches("0"), None);
    }

    #[test]
    fn cpu_times_are_read_after_the_command_name() {
        let line = "4242 (sagahost (x) y) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(line), Some(Duration::from_secs(3)));
        assert_eq!(parse_stat("garbage"), None);
        // This test process has a /proc entry on Linux.
        if cfg!(target_os = "linux") {
            assert!(cpu_time("self").is_some());
        }
    }
}
