//! The host side of the WIT imports: `state` (reads of committed state, buffered writes) and
//! `log`, written once for every version of the `sagahost:plugin` world.
//!
//! The functions are defined on the linker by hand rather than through `bindgen!`'s traits,
//! so one definition serves every world version: a world module calls [`add_to_linker`] with
//! its version and its log level type. They receive strings and lists as `WasmStr` and
//! `WasmList`, which still lie in the plugin's memory, so sizes are checked before anything
//! is copied into the host: a state write over the limit, a key no write could have made, a
//! log line over the per-call count are refused or dropped without a copy, and a long log
//! line is cut to its limit before it is copied.
//!
//! What is still copied before a check: a component using UTF-16 strings (no Rust component
//! does) has every string transcoded whole by `WasmStr::to_str`; and the results of `execute`
//! and `compensate` (output, error messages) are lifted whole by the generated bindings
//! before `call.rs` checks them. Both are bounded by the call's memory limit, since they lie
//! in the plugin's memory first.
//!
//! This module must not decide how a call ends: it records what the host did wrong in
//! [`HostState::host_error`] and lets `call.rs` classify.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{ComponentType, Lift, Linker, WasmList, WasmStr};
use wasmtime::StoreContextMut;

use super::call::{sanitize, CallState, Deadline};
use super::{Limits, PluginReader};

/// Severity of a plugin's log line, whatever world version the plugin targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// What the host keeps for the imports during one call.
pub(super) struct HostState {
    pub(super) plugin: String,
    pub(super) saga_id: String,
    pub(super) step: String,
    reader: Arc<dyn PluginReader>,
    limits: Limits,
    /// When the call's time is up; state reads move it back by the time they take.
    pub(super) deadline: Arc<Deadline>,
    /// How long one state read may take before it is the host's failure; also the most read
    /// time credited back to the plugin in one call.
    read_timeout: Duration,
    /// Read time not yet credited back.
    read_credit: Duration,
    /// Buffered writes: `None` is a delete. A BTreeMap so the commit order is deterministic.
    pub(super) writes: BTreeMap<String, Option<Vec<u8>>>,
    /// Whether the call's reads are checked at its commit ([`crate::store::StateRead::checked`]),
    /// and so may also be answered from the host's memory where other hosts write the
    /// database: only for a component that cannot reach another service, whose read of a
    /// value changed meanwhile can go nowhere but into that refused commit.
    guess: bool,
    /// The reads to check ([`MAX_CHECKS`] at most; later reads are not checked), the first of
    /// each key: the commit applies only if they still hold.
    pub(super) checks: BTreeMap<String, Option<Vec<u8>>>,
    write_bytes: usize,
    log_lines: u32,
    pub(super) logs_dropped: u32,
    /// The log lines kept, when the runtime records calls (`Runtime::recording`).
    pub(super) recorded_logs: Option<Vec<super::LogLine>>,
    /// Set when an import failed for the host's own reasons (the database): the call then
    /// ends unavailable, whatever the plugin did with the trap.
    pub(super) host_error: Option<String>,
}

impl HostState {
    #[allow(clippy::too_many_arguments, reason = "one call's context, each part of a different kind")]
    pub(super) fn new(
        plugin: &str,
        saga_id: &str,
        step: &str,
        reader: Arc<dyn PluginReader>,
        guess: bool,
        limits: Limits,
        deadline: Arc<Deadline>,
        timeout: Duration,
    ) -> HostState {
        HostState {
            plugin: plugin.to_owned(),
            saga_id: saga_id.to_owned(),
            step: step.to_owned(),
            reader,
            limits,
            deadline,
            read_timeout: timeout,
            read_credit: timeout,
            writes: BTreeMap::new(),
            guess,
            checks: BTreeMap::new(),
            write_bytes: 0,
            log_lines: 0,
            logs_dropped: 0,
            recorded_logs: None,
            host_error: None,
        }
    }

    /// Whether `bytes` more of state writes stay within the call's limit. Asked before the
    /// bytes are copied; the caller charges them once copied.
    fn charge_check(&self, bytes: usize) -> wasmtime::Result<()> {
        if self.write_bytes.saturating_add(bytes) > self.limits.state_write_bytes {
            return Err(wasmtime::format_err!(
                "plugin wrote more than {} bytes of state in one call",
                self.limits.state_write_bytes
            ));
        }
        Ok(())
    }
}

/// Defines `sagahost:plugin/{types,state,log}@{version}` on the linker. `L` is the world's
/// generated log level enum.
///
/// `with_scan` adds `state.scan` (0.2.0 on).
pub(super) fn add_to_linker<L>(linker: &mut Linker<CallState>, version: &str, with_scan: bool) -> wasmtime::Result<()>
where
    L: ComponentType + Lift + Into<Level> + Send + Sync + 'static,
{
    // `types` holds only type definitions, but a component imports it all the same.
    linker.instance(&format!("sagahost:plugin/types@{version}"))?;
    let mut state = linker.instance(&format!("sagahost:plugin/state@{version}"))?;
    state.func_wrap_async("get", |store, (key,): (WasmStr,)| {
        Box::new(async move {
            in_a_call(&store)?;
            Ok((get(store, key).await?,))
        })
    })?;
    state.func_wrap("set", |store, (key, value): (WasmStr, WasmList<u8>)| {
        in_a_call(&store)?;
        set(store, key, Some(value))
    })?;
    state.func_wrap("delete", |store, (key,): (WasmStr,)| {
        in_a_call(&store)?;
        set(store, key, None)
    })?;
    if with_scan {
        state.func_wrap_async("scan", |store, (prefix, after, limit): (WasmStr, Option<WasmStr>, u32)| {
            Box::new(async move {
                in_a_call(&store)?;
                Ok((scan(store, prefix, after, limit).await?,))
            })
        })?;
    }
    let mut log = linker.instance(&format!("sagahost:plugin/log@{version}"))?;
    log.func_wrap("log", |store, (level, message): (L, WasmStr)| {
        in_a_call(&store)?;
        self::log(store, level.into(), message)
    })?;
    Ok(())
}

/// Traps an import made while the component is instantiated ahead of any call (a start
/// function's, `spare.rs`): there is no call yet whose state it could read or write. The
/// instance is thrown away and the component is instantiated by its calls from then on.
pub(super) fn in_a_call(store: &StoreContextMut<'_, CallState>) -> wasmtime::Result<()> {
    if store.data().ahead {
        return Err(wasmtime::format_err!("the component called the host while it was instantiated ahead of a call"));
    }
    Ok(())
}

/// `state.get`: the call's own buffered write if there is one, else the committed value (see
/// [`read`] for how the time of the read counts).
async fn get(mut store: StoreContextMut<'_, CallState>, key: WasmStr) -> wasmtime::Result<Option<Vec<u8>>> {
    let key = {
        let key = key.to_str(&store)?;
        check_key(&key)?;
        key.into_owned()
    };
    let host = &mut store.data_mut().host;
    if let Some(buffered) = host.writes.get(&key) {
        return Ok(buffered.clone());
    }
    if let Some(checked) = host.checks.get(&key) {
        return Ok(checked.clone());
    }
    let guess = host.guess && host.checks.len() < MAX_CHECKS;
    let (reader, plugin) = (Arc::clone(&host.reader), host.plugin.clone());
    let answer = read(&mut store, reader.get(&plugin, &key, guess)).await?;
    if answer.checked {
        store.data_mut().host.checks.insert(key, answer.value.clone());
    }
    Ok(answer.value)
}

/// Most reads of one call checked at the commit: each check is a condition of the commit's
/// statement, which takes a bounded number of arguments (and a chain ends at
/// [`crate::driver`]'s bound on state keys, checks counted). Later reads ask the database and
/// are not checked.
pub const MAX_CHECKS: usize = 64;

/// Most entries one `state.scan` returns, whatever `limit` the plugin asks for.
pub const MAX_SCAN: u32 = 1000;

/// `state.scan`: committed keys with the prefix, merged with the call's own buffered writes
/// (a buffered value replaces the committed one, a buffered delete hides it), in byte order,
/// strictly after `after`, at most `limit` (capped at [`MAX_SCAN`]).
async fn scan(
    mut store: StoreContextMut<'_, CallState>,
    prefix: WasmStr,
    after: Option<WasmStr>,
    limit: u32,
) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
    let prefix = {
        let prefix = prefix.to_str(&store)?;
        check_key(&prefix)?;
        prefix.into_owned()
    };
    let after = match after {
        None => None,
        Some(after) => {
            let after = after.to_str(&store)?;
            check_key(&after)?;
            Some(after.into_owned())
        }
    };
    let limit = limit.min(MAX_SCAN);
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut after = after;
    loop {
        let host = &mut store.data_mut().host;
        let in_range = |k: &String| k.starts_with(prefix.as_str()) && after.as_ref().is_none_or(|a| k > a);
        let buffered: Vec<(String, Option<Vec<u8>>)> =
            host.writes.iter().filter(|(k, _)| in_range(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        // Each buffered delete may hide one committed row: read that many more.
        let deletes = u32::try_from(buffered.iter().filter(|(_, v)| v.is_none()).count()).unwrap_or(u32::MAX);
        let want = limit.saturating_add(deletes);
        let (reader, plugin) = (Arc::clone(&host.reader), host.plugin.clone());
        let committed = read(&mut store, reader.scan(&plugin, &prefix, after.as_deref(), want)).await?;
        let (page, horizon) = merge(committed, buffered, want, limit);
        // An empty page means the end to the plugin: one whose committed rows (a page cut at
        // its byte budget) were all deleted by this call is not, so read on past them.
        match horizon {
            Some(horizon) if page.is_empty() => after = Some(horizon),
            _ => return Ok(page),
        }
    }
}

/// The page a scan returns: `committed` (a page of at most `want` rows) overlaid with the
/// buffered writes, cut to `limit`; and the page's horizon, when the committed page is full
/// (or as big in bytes as a store's page gets): keys past its last row are unknown, so
/// buffered keys beyond it wait for the next page.
fn merge(
    committed: Vec<(String, Vec<u8>)>,
    buffered: Vec<(String, Option<Vec<u8>>)>,
    want: u32,
    limit: u32,
) -> (Vec<(String, Vec<u8>)>, Option<String>) {
    // A page is also cut at about `STATE_PAGE_BYTES` of values; one that big may have been.
    let bytes: usize = committed.iter().map(|(_, v)| v.len()).sum();
    let full = committed.len() >= want as usize || bytes >= crate::store::STATE_PAGE_BYTES;
    let horizon = if full { committed.last().map(|(k, _)| k.clone()) } else { None };
    let mut page: BTreeMap<String, Vec<u8>> = committed.into_iter().collect();
    for (key, value) in buffered {
        if horizon.as_ref().is_some_and(|h| key > *h) {
            continue;
        }
        match value {
            Some(v) => page.insert(key, v),
            None => page.remove(&key),
        };
    }
    (page.into_iter().take(limit as usize).collect(), horizon)
}

/// Awaits a read of committed data for a plugin import.
///
/// Time blocked here is the host's, not the plugin's: the call's deadline moves back by the
/// time the read took, up to the call's timeout in total (so a plugin that reads in a loop
/// still runs out of time). A single read that takes longer than the call's timeout is the
/// host's failure (its database is slow or gone): the call ends unavailable and the attempt
/// does not count.
async fn read<T>(
    store: &mut StoreContextMut<'_, CallState>,
    reading: impl std::future::Future<Output = anyhow::Result<T>>,
) -> wasmtime::Result<T> {
    let host = &mut store.data_mut().host;
    let (bound, deadline) = (host.read_timeout, Arc::clone(&host.deadline));
    // No wasm runs while we wait, but the call's guard watches the deadline: hold it off for
    // as long as the read may take, then keep only what is credited.
    deadline.extend(bound);
    let started = Instant::now();
    let result = tokio::time::timeout(bound, reading).await;
    let host = &mut store.data_mut().host;
    let credit = started.elapsed().min(host.read_credit);
    host.read_credit -= credit;
    deadline.shorten(bound.saturating_sub(credit));
    let failure = match result {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => format!("state read failed: {e:#}"),
        Err(_) => format!(
            "a state read took longer than the call's timeout of {} ms; the database is slow or unreachable",
            bound.as_millis()
        ),
    };
    host.host_error = Some(failure.clone());
    Err(wasmtime::format_err!("{failure}"))
}

/// The longest state key a plugin may use. Keys are part of a primary key in both databases;
/// PostgreSQL cannot index much more than 2.7 KB in one B-tree entry.
pub const MAX_STATE_KEY_BYTES: usize = 1024;

/// A key every database can store, checked the same on both at the boundary: a key that one
/// database refuses would otherwise fail the commit (or the read) on every retry. The plugin
/// broke the contract, so its attempt fails (a trap), and nothing else does.
fn check_key(key: &str) -> wasmtime::Result<()> {
    if key.len() > MAX_STATE_KEY_BYTES {
        return Err(wasmtime::format_err!(
            "state key of {} bytes is longer than {MAX_STATE_KEY_BYTES} bytes; use shorter keys",
            key.len()
        ));
    }
    if key.contains('\0') {
        return Err(wasmtime::format_err!("a state key may not contain a NUL character"));
    }
    Ok(())
}

/// `state.set` (`value` is `Some`) and `state.delete`: charged against the write limit while
/// the bytes still lie in the plugin's memory, then buffered.
fn set(mut store: StoreContextMut<'_, CallState>, key: WasmStr, value: Option<WasmList<u8>>) -> wasmtime::Result<()> {
    let key_str = key.to_str(&store)?;
    check_key(&key_str)?;
    let bytes = key_str.len().saturating_add(value.as_ref().map_or(0, WasmList::len));
    store.data().host.charge_check(bytes)?;
    let host = &store.data().host;
    if host.writes.len() >= super::MAX_STATE_KEYS && !host.writes.contains_key(key_str.as_ref()) {
        return Err(wasmtime::format_err!(
            "plugin wrote more than {} state keys in one call (sets and deletes)",
            super::MAX_STATE_KEYS
        ));
    }
    let key = key_str.into_owned();
    let value = value.map(|v| v.as_le_slice(&store).to_vec());
    let host = &mut store.data_mut().host;
    host.write_bytes = host.write_bytes.saturating_add(bytes);
    host.writes.insert(key, value);
    Ok(())
}

/// `log.log`: at most `log_lines` lines per call, each sanitised (no control characters, so a
/// plugin cannot forge log lines or send escapes to a terminal) and cut to `log_line_bytes`
/// before it is copied (a dropped line is not read at all).
fn log(mut store: StoreContextMut<'_, CallState>, level: Level, message: WasmStr) -> wasmtime::Result<()> {
    let host = &mut store.data_mut().host;
    if host.log_lines >= host.limits.log_lines {
        host.logs_dropped = host.logs_dropped.saturating_add(1);
        return Ok(());
    }
    host.log_lines += 1;
    let max = host.limits.log_line_bytes;
    let message = sanitize(&message.to_str(&store)?, max);
    let host = &mut store.data_mut().host;
    if let Some(lines) = &mut host.recorded_logs {
        lines.push(super::LogLine { level: level.name(), message: message.clone() });
    }
    let (saga_id, step, plugin) = (&host.saga_id, &host.step, &host.plugin);
    match level {
        Level::Trace => tracing::trace!(target: "plugin", %saga_id, %step, %plugin, "{message}"),
        Level::Debug => tracing::debug!(target: "plugin", %saga_id, %step, %plugin, "{message}"),
        Level::Info => tracing::info!(target: "plugin", %saga_id, %step, %plugin, "{message}"),
        Level::Warn => tracing::warn!(target: "plugin", %saga_id, %step, %plugin, "{message}"),
        Level::Error => tracing::error!(target: "plugin", %saga_id, %step, %plugin, "{message}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::merge;

    fn rows(keys: &[&str]) -> Vec<(String, Vec<u8>)> {
        keys.iter().map(|k| (k.to_string(), b"c".to_vec())).collect()
    }

    fn keys(page: &[(String, Vec<u8>)]) -> Vec<&str> {
        page.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn buffered_writes_overlay_the_committed_page() {
        let buffered = vec![("a/2".to_owned(), None), ("a/25".to_owned(), Some(b"b".to_vec()))];
        let (page, _) = merge(rows(&["a/1", "a/2", "a/3"]), buffered, 3, 2);
        assert_eq!(keys(&page), ["a/1", "a/25"]);
        assert_eq!(page[1].1, b"b");
    }

    #[test]
    fn buffered_keys_past_a_full_committed_page_wait_for_the_next_page() {
        // The committed page is full at a/3: a/4 (committed, unseen) may come before a/9.
        let buffered = vec![("a/9".to_owned(), Some(b"b".to_vec()))];
        let (page, horizon) = merge(rows(&["a/1", "a/2", "a/3"]), buffered, 3, 5);
        assert_eq!((keys(&page), horizon.as_deref()), (vec!["a/1", "a/2", "a/3"], Some("a/3")));
        // Not full: everything committed is known, so a/9 belongs to this page.
        let buffered = vec![("a/9".to_owned(), Some(b"b".to_vec()))];
        let (page, horizon) = merge(rows(&["a/1"]), buffered, 3, 5);
        assert_eq!((keys(&page), horizon), (vec!["a/1", "a/9"], None));
    }
}
