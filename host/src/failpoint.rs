//! Failpoints for crash tests: labelled places where the process can be made to die.
//!
//! `SAGAHOST_FAILPOINTS="driver-after-call=abort@3,relay-after-publish=abort"` aborts the
//! process (as abruptly as SIGKILL: no destructors, no flushing) at the 3rd hit of
//! `driver-after-call`, or the first of `relay-after-publish`. Unset, a failpoint costs one
//! relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Point {
    at_hit: u64,
    hits: AtomicU64,
}

fn points() -> &'static HashMap<String, Point> {
    static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let spec = std::env::var("SAGAHOST_FAILPOINTS").unwrap_or_default();
        spec.split(',')
            .filter_map(|entry| {
                let (name, action) = entry.trim().split_once('=')?;
                let at_hit = match action.split_once('@') {
                    Some(("abort", n)) => n.parse().ok()?,
                    None if action == "abort" => 1,
                    _ => return None,
                };
                Some((name.to_owned(), Point { at_hit, hits: AtomicU64::new(0) }))
            })
            .collect()
    })
}

/// Called by [`failpoint!`](crate::failpoint): aborts if the named failpoint is armed and due.
pub fn hit(name: &str) {
    let points = points();
    if points.is_empty() {
        return;
    }
    if let Some(p) = points.get(name) {
        let n = p.hits.fetch_add(1, Ordering::Relaxed) + 1;
        if n == p.at_hit {
            eprintln!("failpoint {name} hit {n} times: aborting");
            std::process::abort();
        }
    }
}

/// Marks a place where crash tests may kill the process.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        $crate::failpoint::hit($name)
    };
}
