// The sagahost web console: plain JavaScript, no build step, no dependencies.
//
// A client of the public HTTP API like any other. Pages (drawn from the location, so deep links
// work): /ui/ (sagas by type and status, search by id), /ui/sagas/{type}/{id} (one saga's
// timeline), /ui/plugins (plugins, versions and bindings), /ui/stuck (COMPENSATION_FAILED sagas
// with retry and resolve). Every page re-reads its data every 2 s while it is shown.
//
// Tokens live in `state` only: never in storage, cookies or the URL, so they are gone when the
// page closes. Data from the API is always inserted as text (textContent, attributes), never as
// HTML; the Content-Security-Policy forbids inline script as a second line.
"use strict";

const POLL_MS = 2000;
// The saga type shown when none is asked for: the host writes it into the page.
const DEFAULT_TYPE = document.documentElement.dataset.defaultSagaType;
const STATUSES = ["CREATED", "COMPLETED", "COMPENSATING", "CANCELLED", "COMPENSATION_FAILED"];
const TERMINAL = new Set(["COMPLETED", "CANCELLED"]);

const state = {
  adminToken: "",
  apiToken: "",
  actor: "",
  // Saga definitions by type (admin), for the type list, step state labels and bindings.
  definitions: null,
  // digest -> {name, version}: which plugin version a digest is (admin).
  digests: new Map(),
  // Bumped on every navigation: a poll of an older page stops.
  generation: 0,
  timer: null,
};

// ---------------------------------------------------------------------------------------------
// DOM helpers. Children are nodes or strings; strings become text nodes.

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(el, ...children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

const $ = (sel) => document.querySelector(sel);

// ---------------------------------------------------------------------------------------------
// The API.

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// A printable-ASCII header value (fetch refuses others).
const headerSafe = (v) => v.replace(/[^\x20-\x7e]/g, "?").trim();

// A saga's events, page after page (1,000 each), up to the first 10,000.
async function sagaEvents(type, id) {
  return allPages(`/sagas/${encodeURIComponent(type)}/${encodeURIComponent(id)}/events`, 10);
}

// The pages of a listing at `path`, following `next_cursor`, at most `max` of them; `more`
// when there were more still.
async function allPages(path, max) {
  const join = path.includes("?") ? "&" : "?";
  let data = [];
  let cursor = null;
  for (let page = 0; page < max; page++) {
    const r = await api("GET", cursor ? `${path}${join}cursor=${encodeURIComponent(cursor)}` : path);
    data = data.concat(r.data);
    cursor = r.next_cursor;
    if (!cursor) break;
  }
  return { data, more: Boolean(cursor) };
}

async function api(method, path, { body, admin = false, key } = {}) {
  const headers = { Accept: "application/json" };
  const token = admin ? state.adminToken : state.apiToken;
  if (token) headers.Authorization = "Bearer " + headerSafe(token);
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (key) headers["Idempotency-Key"] = key;
  // The name's UTF-8 bytes, one per character (a header carries bytes, not text): the host
  // reads them back as UTF-8, so "Zoë" is audited as "Zoë", not "Zo?".
  if (admin && state.actor) headers["X-Actor"] = String.fromCharCode(...new TextEncoder().encode(state.actor.trim())).replace(/[\x00-\x1f\x7f]/g, "");
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  let data = null;
  try {
    data = await r.json();
  } catch (_) {
    data = null;
  }
  if (!r.ok) {
    const e = data && data.error;
    throw new ApiError(r.status, e ? e.code : "http_" + r.status, e ? e.message : r.status + " " + r.statusText);
  }
  return data;
}

// A v4 UUID for Idempotency-Key. crypto.randomUUID needs a secure context; a console served
// over plain HTTP to another machine is not one, getRandomValues works everywhere.
function uuid() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const x = [...b].map((v) => v.toString(16).padStart(2, "0")).join("");
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

const isUuid = (v) => /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(v);

// ---------------------------------------------------------------------------------------------
// Formatting.

function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "";
  if (ms < 1000) return Math.round(ms) + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
  const m = Math.floor(ms / 60000);
  if (m < 60) return `${m} min ${Math.round((ms % 60000) / 1000)} s`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return `${hrs} h ${m % 60} min`;
  return `${Math.floor(hrs / 24)} d ${hrs % 24} h`;
}

function time(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString(undefined, { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

const ms = (iso) => (iso ? Date.parse(iso) : null);

function shortDigest(d) {
  if (!d) return "";
  return d.startsWith("sha256:") ? d.slice(0, 19) + "…" : d;
}

function digestCell(d) {
  if (!d) return "";
  const known = state.digests.get(d);
  return h("span", { title: d }, known ? h("span", {}, `${known.name} v${known.version} `) : null, h("span", { class: "digest" }, shortDigest(d)));
}

function statusBadge(status, extra) {
  return h("span", { class: `status ${status} ${extra || ""}`.trim() }, status);
}

function sagaPath(type, id) {
  return `/ui/sagas/${encodeURIComponent(type)}/${encodeURIComponent(id)}`;
}

// ---------------------------------------------------------------------------------------------
// Page frame: navigation, notices, the live indicator, polling.

function notice(text, error) {
  const n = $("#notice");
  if (!text) {
    n.hidden = true;
    return;
  }
  n.hidden = false;
  n.className = error ? "notice error" : "notice";
  n.textContent = text;
}

function live(ok, detail) {
  const el = $("#live");
  el.className = ok ? "" : "stale";
  el.textContent = ok ? `live · updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}` : `not updating: ${detail}`;
}

function navigate(url) {
  history.pushState(null, "", url);
  notice(null);
  render();
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest && ev.target.closest("a[href]");
  if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith("/ui/")) return;
  ev.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener("popstate", render);

// Runs `load` now and every POLL_MS while this page is shown (paused while the tab is
// hidden). `load` returns false to stop (a settled saga).
function poll(load) {
  const gen = state.generation;
  const tick = async () => {
    if (gen !== state.generation) return;
    let again = true;
    if (!document.hidden) {
      try {
        again = (await load()) !== false;
        live(true);
      } catch (e) {
        live(false, e.message);
      }
      refreshStuckCount().catch(() => {});
    }
    if (gen === state.generation && again) state.timer = setTimeout(tick, POLL_MS);
  };
  tick();
}

// Runs the current page's load at once (after a token changed or an action).
let reload = () => {};

function render() {
  state.generation += 1;
  clearTimeout(state.timer);
  const main = $("#main");
  main.replaceChildren();
  const path = location.pathname.replace(/^\/ui\/?/, "");
  // A malformed escape ("%zz") in a pasted link is no page, not a script error.
  let seg = null;
  try {
    seg = path.split("/").filter(Boolean).map(decodeURIComponent);
  } catch (e) {
    if (!(e instanceof URIError)) throw e;
  }
  for (const id of ["nav-sagas", "nav-stuck", "nav-plugins"]) $("#" + id).classList.remove("active");
  if (seg === null) {
    notFound(main);
  } else if (seg.length === 0) {
    $("#nav-sagas").classList.add("active");
    listPage(main);
  } else if (seg[0] === "sagas" && seg.length === 3) {
    $("#nav-sagas").classList.add("active");
    sagaPage(main, seg[1], seg[2]);
  } else if (seg[0] === "plugins" && seg.length === 1) {
    $("#nav-plugins").classList.add("active");
    pluginsPage(main);
  } else if (seg[0] === "stuck" && seg.length === 1) {
    $("#nav-stuck").classList.add("active");
    stuckPage(main);
  } else {
    notFound(main);
  }
}

function notFound(main) {
  document.title = "Not found · sagahost";
  append(main, h("h1", {}, "No such page"), h("p", {}, "The console has no page at this address. ", h("a", { href: "/ui/" }, "Go to the saga list")));
}

// ---------------------------------------------------------------------------------------------
// Catalog (admin): saga types, step state labels, which plugin version a digest is.

async function loadCatalog() {
  if (!state.adminToken) {
    state.definitions = null;
    state.digests = new Map();
    return;
  }
  const [defs, plugins] = await Promise.all([api("GET", "/admin/sagas", { admin: true }), api("GET", "/admin/plugins", { admin: true })]);
  state.definitions = defs.data;
  const digests = new Map();
  for (const p of plugins.data) p.versions.forEach((v, i) => digests.set(v.digest, { name: p.name, version: i + 1 }));
  state.digests = digests;
  return plugins.data;
}

function knownTypes(extra) {
  const types = new Set(state.definitions ? state.definitions.map((d) => d.type) : [DEFAULT_TYPE]);
  if (extra) types.add(extra);
  return [...types].sort();
}

// The most stuck sagas of one type the console lists (pages of 100); past it, it says so.
const STUCK_PAGES = 10;

// Every COMPENSATION_FAILED saga of `type`, page after page, up to STUCK_PAGES pages; `more`
// when there were more still.
async function stuckOf(type) {
  const stuck = await allPages(`/sagas/${encodeURIComponent(type)}?status=COMPENSATION_FAILED&limit=100`, STUCK_PAGES);
  return { type, ...stuck };
}

async function refreshStuckCount() {
  const pages = await Promise.all(knownTypes().map((t) => stuckOf(t).catch(() => ({ data: [], more: false }))));
  const n = pages.reduce((a, p) => a + p.data.length, 0);
  const badge = $("#stuck-count");
  badge.hidden = n === 0;
  badge.textContent = pages.some((p) => p.more) ? `${n}+` : String(n);
}

// ---------------------------------------------------------------------------------------------
// /ui/ — sagas of a type, filtered by status, searched by id.

function listPage(main) {
  document.title = "Sagas · sagahost";
  const params = new URLSearchParams(location.search);
  const type = params.get("type") || DEFAULT_TYPE;
  const status = params.get("status") || "";
  const cursor = params.get("cursor") || "";
  const query = params.get("q") || "";

  const typeInput = h("input", { id: "type", list: "types", value: type, size: 14, spellcheck: "false" });
  const typeList = h("datalist", { id: "types" });
  const statusSelect = h("select", { id: "status" });
  const search = h("input", { id: "search", type: "search", value: query, placeholder: "saga id (or part of one on this page)", spellcheck: "false" });
  const apply = () => {
    const p = new URLSearchParams();
    p.set("type", typeInput.value.trim() || DEFAULT_TYPE);
    if (statusSelect.value) p.set("status", statusSelect.value);
    if (search.value.trim()) p.set("q", search.value.trim());
    navigate("/ui/?" + p.toString());
  };
  const fillStatuses = () => {
    const labels = new Set(STATUSES);
    const def = state.definitions && state.definitions.find((d) => d.type === type);
    if (def) def.steps.forEach((st) => st.state && labels.add(st.state));
    if (status) labels.add(status);
    replace(statusSelect, h("option", { value: "" }, "any status"), [...labels].map((l) => h("option", { value: l, selected: l === status }, l)));
    replace(typeList, knownTypes(type).map((t) => h("option", { value: t })));
  };
  fillStatuses();
  typeInput.addEventListener("change", apply);
  statusSelect.addEventListener("change", apply);
  const form = h(
    "form",
    { class: "filters", id: "filters", onsubmit: (e) => (e.preventDefault(), find()) },
    h("label", {}, "Saga type", typeInput, typeList),
    h("label", {}, "Status", statusSelect),
    h("label", {}, "Search by id", search),
    h("button", { type: "submit", class: "primary", id: "search-button" }, "Search"),
  );
  const body = h("div", { id: "list" });
  append(main, h("h1", {}, "Sagas"), form, body);

  // A whole id: open that saga (of this type, else of any known type). Part of one: filter.
  const find = async () => {
    const q = search.value.trim();
    if (!isUuid(q)) return apply();
    for (const t of [typeInput.value.trim() || DEFAULT_TYPE, ...knownTypes().filter((t) => t !== typeInput.value.trim())]) {
      try {
        await api("GET", `/sagas/${encodeURIComponent(t)}/${q}`);
        return navigate(sagaPath(t, q.toLowerCase()));
      } catch (e) {
        if (e.status !== 404) return notice(e.message, true);
      }
    }
    notice(`No saga with id ${q} among the types ${knownTypes().join(", ")}`, true);
  };

  reload = async () => {
    const p = new URLSearchParams({ limit: "50" });
    if (status) p.set("status", status);
    if (cursor) p.set("cursor", cursor);
    const page = await api("GET", `/sagas/${encodeURIComponent(type)}?${p}`);
    let rows = page.data;
    if (query && !isUuid(query)) rows = rows.filter((r) => r.id.includes(query.toLowerCase()));
    const pager = h("p", { class: "actions" });
    if (cursor) {
      const first = new URLSearchParams(location.search);
      first.delete("cursor");
      append(pager, h("a", { href: "/ui/?" + first }, "← newest"));
    }
    if (page.next_cursor) {
      const next = new URLSearchParams(location.search);
      next.set("cursor", page.next_cursor);
      append(pager, h("a", { href: "/ui/?" + next, id: "older" }, "older →"));
    }
    replace(
      body,
      rows.length === 0
        ? h("p", { class: "empty" }, query ? "No saga on this page matches." : "No sagas" + (status ? ` with status ${status}` : "") + ".")
        : h(
            "table",
            { class: "sagas" },
            h("thead", {}, h("tr", {}, h("th", {}, "Id"), h("th", {}, "Status"), h("th", {}, "Reason"), h("th", {}, "Created"), h("th", {}, "Updated"), h("th", {}, "Age"))),
            h(
              "tbody",
              {},
              rows.map((r) =>
                h(
                  "tr",
                  { "data-id": r.id, "data-status": r.status },
                  h("td", {}, h("a", { href: sagaPath(r.saga_type, r.id), class: "saga-link mono" }, r.id)),
                  h("td", {}, statusBadge(r.status)),
                  h("td", {}, r.reason || ""),
                  h("td", {}, time(r.created_at)),
                  h("td", {}, time(r.updated_at)),
                  h("td", { class: "num" }, duration((TERMINAL.has(r.status) ? ms(r.updated_at) : Date.now()) - ms(r.created_at))),
                ),
              ),
            ),
          ),
      pager,
    );
  };
  let filled = false;
  const fillStatusesOnce = () => {
    if (!filled && state.definitions) {
      filled = true;
      fillStatuses();
    }
  };
  poll(async () => {
    await reload();
    fillStatusesOnce();
  });
  if (query && isUuid(query)) find();
}

// ---------------------------------------------------------------------------------------------
// /ui/sagas/{type}/{id} — one saga's timeline.

function sagaPage(main, type, id) {
  document.title = `${type} ${id} · sagahost`;
  const head = h("div", { id: "saga-head" });
  const ops = h("div", { id: "saga-ops" });
  const chart = h("div", { id: "saga-chart" });
  const steps = h("div", { id: "saga-steps" });
  const events = h("div", { id: "saga-events" });
  const input = h("div", { id: "saga-input" });
  append(
    main,
    h("p", {}, h("a", { href: `/ui/?type=${encodeURIComponent(type)}` }, `← ${type} sagas`)),
    head,
    ops,
    h("h2", {}, "Timeline"),
    chart,
    h("h2", {}, "Steps"),
    steps,
    h("h2", {}, "Events"),
    events,
    input,
  );
  let shownStatus = null;
  reload = async () => {
    const [saga, history] = await Promise.all([
      api("GET", `/sagas/${encodeURIComponent(type)}/${encodeURIComponent(id)}`),
      sagaEvents(type, id),
    ]);
    const evs = history.data;
    const t0 = ms(saga.created_at);
    const end = TERMINAL.has(saga.status) ? ms(saga.updated_at) : Date.now();
    replace(
      head,
      h("h1", {}, `${type} `, h("span", { class: "mono" }, saga.id), " ", h("span", { id: "saga-status", class: `status ${saga.status}` }, saga.status)),
      h(
        "dl",
        { class: "meta" },
        h("dt", {}, "Reason"),
        h("dd", { id: "saga-reason" }, saga.reason || "—"),
        h("dt", {}, "Created"),
        h("dd", {}, time(saga.created_at)),
        h("dt", {}, "Updated"),
        h("dd", {}, time(saga.updated_at)),
        h("dt", {}, TERMINAL.has(saga.status) ? "Took" : "Running for"),
        h("dd", {}, duration(end - t0)),
      ),
    );
    if (saga.status !== shownStatus) {
      shownStatus = saga.status;
      replace(ops, saga.status === "COMPENSATION_FAILED" ? operatorPanel(saga, () => reload()) : null);
    }
    replace(chart, timelineChart(saga, evs, chart.clientWidth));
    replace(steps, stepsTable(saga, evs));
    replace(events, eventsTable(saga, evs));
    if (!input.firstChild) {
      replace(input, h("details", {}, h("summary", {}, "Input (sensitive fields redacted)"), h("pre", {}, JSON.stringify(saga.input, null, 2))));
    }
    // A settled saga changes no more (a stuck one may: an operator elsewhere).
    return !TERMINAL.has(saga.status);
  };
  poll(async () => {
    try {
      return await reload();
    } catch (e) {
      if (e.status === 404) {
        replace(head, h("h1", {}, "No such saga"), h("p", {}, `There is no ${type} saga with id ${id}. `, h("a", { href: "/ui/" }, "Back to the list")));
        return false;
      }
      throw e;
    }
  });
}

// The step an event is about: its data.step, or for a rejection (the "...Compensating" event)
// the step its reason names.
function eventStep(e, names) {
  if (e.data && typeof e.data.step === "string") return e.data.step;
  if (e.type.endsWith("Compensating") && e.data && typeof e.data.reason === "string") {
    const name = e.data.reason.split(":")[0];
    if (names.includes(name)) return name;
  }
  return null;
}

// What kind of activity ended with an event, for colours and the chart.
function eventKind(e) {
  if (e.type === "StepWaiting" || e.type === "SignalReceived") return "wait";
  if (e.type === "StepRetryScheduled" || e.type.endsWith("CompensationFailed") || e.type === "StepCompensationRetryScheduled") return "error";
  if (e.type === "StepCompensated" || e.type.endsWith("Compensating") || e.type === "CompensationRetried") return "compensation";
  return "";
}

// Spans of activity per step, from the events: each event ends what began when the previous
// event committed (or, after a retry or a timed wait, when it was due again). Rows: one for
// each step's execute attempts (with its waits), one for its compensation when it had one.
function spans(saga, evs) {
  const names = saga.steps.map((st) => st.name);
  const rows = new Map(names.map((n) => [n, { execute: [], compensate: [] }]));
  const marks = [];
  let prev = evs.length ? ms(evs[0].at) : ms(saga.created_at);
  let dueAfter = null; // {step, at}: the next attempt of this step is not due before `at`
  let compensating = false;
  for (const e of evs) {
    const at = ms(e.at);
    const step = eventStep(e, names);
    const row = step && rows.get(step);
    let start = prev;
    if (row && dueAfter && dueAfter.step === step && dueAfter.at > prev && dueAfter.at < at) {
      (compensating ? row.compensate : row.execute).push({ from: prev, to: dueAfter.at, kind: "wait", label: "backoff / wait", event: e });
      start = dueAfter.at;
    }
    dueAfter = null;
    if (e.type.endsWith("Compensating") || e.type === "CompensationRetried") {
      if (row) row.execute.push({ from: start, to: at, kind: "failed", label: `${e.type}: ${e.data.reason || ""}`, event: e });
      compensating = true;
      marks.push({ at, label: e.type, event: e });
    } else if (row && e.type === "StepStarted") {
      // A call out of the host starts here (recorded before it is made): its span, ended by
      // the attempt's result, begins at this event rather than at the one before.
    } else if (row && e.type === "StepWaiting") {
      row.execute.push({ from: start, to: at, kind: "execute", label: `attempt ${e.data.attempt}: wait`, event: e });
      dueAfter = { step, at: e.data.wake_at || Infinity };
    } else if (row && e.type === "SignalReceived") {
      row.execute.push({ from: start, to: at, kind: "wait", label: `waited for ${e.data.signal}`, event: e });
    } else if (row && e.type === "StepRetryScheduled") {
      row.execute.push({ from: start, to: at, kind: "failed", label: `attempt ${e.data.attempt}: ${e.data.error}`, event: e });
      dueAfter = { step, at: e.data.retry_at };
    } else if (row && e.type === "StepCompensationRetryScheduled") {
      row.compensate.push({ from: start, to: at, kind: "failed", label: `compensate attempt ${e.data.attempt}: ${e.data.error}`, event: e });
      dueAfter = { step, at: e.data.retry_at };
    } else if (row && e.type.endsWith("CompensationFailed")) {
      row.compensate.push({ from: start, to: at, kind: "failed", label: `compensation failed: ${e.data.error}`, event: e });
      marks.push({ at, label: e.type, event: e });
    } else if (row && e.type === "StepCompensated") {
      row.compensate.push({ from: start, to: at, kind: "compensate", label: `compensated (attempt ${e.data.attempt})`, event: e });
    } else if (row) {
      row.execute.push({ from: start, to: at, kind: "execute", label: `attempt ${e.data.attempt}: ${e.type}`, event: e });
    } else {
      marks.push({ at, label: e.type, event: e });
    }
    prev = at;
  }
  return { rows, marks };
}

function niceStep(range) {
  const target = range / 6;
  const steps = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 15000, 30000, 60000, 120000, 300000, 600000, 1800000, 3600000, 7200000, 21600000, 43200000, 86400000];
  return steps.find((v) => v >= target) || steps[steps.length - 1];
}

// `width`: the room the chart has (its container's width), so it fills the page.
function timelineChart(saga, evs, width) {
  if (evs.length === 0) return h("p", { class: "empty" }, "No events (they may have been deleted after the outbox retention).");
  const { rows, marks } = spans(saga, evs);
  const t0 = ms(evs[0].at);
  const t1 = Math.max(TERMINAL.has(saga.status) ? ms(evs[evs.length - 1].at) : Date.now(), t0 + 1);
  const labelW = 150, rowH = 22, top = 26;
  const plotW = Math.max(300, (width || 1030) - labelW - 40);
  const lines = [];
  for (const [name, r] of rows) {
    lines.push({ label: name, spans: r.execute });
    if (r.compensate.length) lines.push({ label: `${name} ↺ compensate`, spans: r.compensate });
  }
  const height = top + lines.length * rowH + 24;
  const x = (t) => labelW + ((t - t0) / (t1 - t0)) * plotW;
  const svg = s("svg", { width: labelW + plotW + 20, height, viewBox: `0 0 ${labelW + plotW + 20} ${height}`, role: "img", "aria-label": "Timeline of the saga's steps" });
  // Time axis.
  const step = niceStep(t1 - t0);
  for (let t = 0; t <= t1 - t0; t += step) {
    append(svg, s("line", { class: "axis", x1: x(t0 + t), x2: x(t0 + t), y1: top - 6, y2: height - 20 }), s("text", { class: "tick", x: x(t0 + t) + 2, y: height - 6 }, "+" + duration(t)));
  }
  // Saga-level marks: created, compensating, finished, operator actions.
  for (const m of marks) {
    append(svg, s("rect", { class: m.label.endsWith("CompensationFailed") ? "mark error" : "mark", x: x(m.at) - 1, y: 4, width: 3, height: height - 28 }, s("title", {}, `${m.label} at ${time(m.event.at)}`)));
  }
  append(svg, s("text", { x: 4, y: 14 }, "saga events"));
  lines.forEach((line, i) => {
    const y = top + i * rowH;
    append(svg, s("text", { x: 4, y: y + 14 }, line.label));
    for (const sp of line.spans) {
      const cls = sp.kind === "wait" ? "bar-wait" : line.label.includes("↺") ? "bar-compensate" : "bar-execute";
      const w = Math.max(x(sp.to) - x(sp.from), 2);
      append(
        svg,
        s(
          "rect",
          { class: `${cls} ${sp.kind === "failed" ? "failed" : ""}`, x: x(sp.from), y: y + 3, width: w, height: rowH - 8, rx: 2 },
          s("title", {}, `${sp.label}\n${duration(sp.to - sp.from)} (${time(new Date(sp.from).toISOString())} → ${time(new Date(sp.to).toISOString())})`),
        ),
      );
    }
  });
  return h(
    "div",
    { class: "chart", id: "timeline-chart" },
    svg,
    h(
      "div",
      { class: "legend" },
      h("span", {}, h("i", { class: "l-execute" }), "execute"),
      h("span", {}, h("i", { class: "l-wait" }), "wait / backoff"),
      h("span", {}, h("i", { class: "l-compensate" }), "compensate"),
      h("span", {}, h("i", { class: "l-failed" }), "failed attempt"),
      h("span", {}, `total ${duration(t1 - t0)}; a bar runs from the previous commit to this one`),
    ),
  );
}

function stepsTable(saga, evs) {
  const { rows } = spans(saga, evs);
  const total = (list) => list.filter((sp) => sp.kind !== "wait").reduce((a, sp) => a + (sp.to - sp.from), 0);
  return h(
    "table",
    { class: "steps" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Step", "Status", "Attempts", "Execute plugin", "Execute time", "Compensate attempts", "Compensate plugin", "Compensate time", "Started", "Finished", "Last error"].map((t) => h("th", {}, t)),
      ),
    ),
    h(
      "tbody",
      {},
      saga.steps.map((st) => {
        const r = rows.get(st.name);
        return h(
          "tr",
          { "data-step": st.name },
          h("td", {}, st.name, st.waiting_for ? h("div", { class: "hint" }, `waiting for signal ${st.waiting_for}`) : null),
          h("td", {}, statusBadge(st.status)),
          h("td", { class: "num" }, st.attempts),
          h("td", {}, digestCell(st.execute_digest)),
          h("td", { class: "num" }, r.execute.length ? duration(total(r.execute)) : ""),
          h("td", { class: "num" }, st.compensate_attempts || ""),
          h("td", {}, digestCell(st.compensate_digest)),
          h("td", { class: "num" }, r.compensate.length ? duration(total(r.compensate)) : ""),
          h("td", {}, time(st.started_at)),
          h("td", {}, time(st.finished_at)),
          h("td", { class: "error-text" }, st.last_error || ""),
        );
      }),
    ),
  );
}

function eventDetails(e) {
  const d = e.data || {};
  const parts = [];
  if (d.attempt !== undefined) parts.push(`attempt ${d.attempt}`);
  if (d.attempts !== undefined) parts.push(`after ${d.attempts} attempts`);
  if (d.signal) parts.push(`signal ${d.signal}`);
  if (d.wake_at) parts.push(`wakes at ${time(new Date(d.wake_at).toISOString())}`);
  if (d.retry_at) parts.push(`retry at ${time(new Date(d.retry_at).toISOString())}`);
  if (d.note) parts.push(`note: ${d.note}`);
  if (d.reason && !d.error) parts.push(`reason: ${d.reason}`);
  const out = [parts.join(" · ")];
  if (d.error) out.push(h("div", { class: "error-text" }, d.error));
  if (d.output !== undefined && d.output !== null) out.push(h("details", {}, h("summary", {}, "output"), h("pre", {}, JSON.stringify(d.output, null, 2))));
  return out;
}

function eventsTable(saga, evs) {
  if (evs.length === 0) return h("p", { class: "empty" }, "No events.");
  const names = saga.steps.map((st) => st.name);
  const t0 = ms(evs[0].at);
  let prev = t0;
  return h(
    "div",
    {},
    evs[0].seq > 1 ? h("p", { class: "hint" }, `Events before #${evs[0].seq} were deleted after the outbox retention.`) : null,
    h(
      "table",
      { class: "events" },
      h("thead", {}, h("tr", {}, ["#", "At", "Since start", "Took", "Event", "Step", "Saga status", "Details"].map((t) => h("th", {}, t)))),
      h(
        "tbody",
        {},
        evs.map((e) => {
          const at = ms(e.at);
          const took = at - prev;
          prev = at;
          return h(
            "tr",
            { class: eventKind(e), "data-type": e.type },
            h("td", { class: "num" }, e.seq),
            h("td", {}, time(e.at)),
            h("td", { class: "num" }, "+" + duration(at - t0)),
            h("td", { class: "num" }, e.seq === evs[0].seq ? "" : duration(took)),
            h("td", { class: "type" }, e.type),
            h("td", {}, eventStep(e, names) || ""),
            h("td", {}, statusBadge(e.status)),
            h("td", {}, eventDetails(e)),
          );
        }),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// Operator actions (admin): retry the compensation, or resolve by hand with a note.

function operatorPanel(saga, after) {
  const note = h("input", { class: "note", type: "text", placeholder: "note (required to resolve)", maxlength: 2000 });
  const retry = h("button", { class: "primary retry", type: "button" }, "Retry compensation");
  const resolve = h("button", { class: "danger resolve", type: "button" }, "Resolve by hand");
  const hint = h("span", { class: "hint" }, state.adminToken ? "" : "enter the admin token above to act");
  const act = async (action) => {
    if (!state.adminToken) return notice("Enter the admin token at the top of the page first", true);
    const text = note.value.trim();
    if (action === "resolve" && !text) return notice("Say what was done by hand in the note, e.g. refunded in the PSP console", true);
    retry.disabled = resolve.disabled = true;
    try {
      const body = text ? { note: text } : action === "retry" ? {} : undefined;
      const r = await api("POST", `/admin/sagas/${encodeURIComponent(saga.id)}/${action}`, { body, admin: true, key: uuid() });
      notice(`${action === "retry" ? "Retry" : "Resolve"} accepted: ${saga.saga_type} ${saga.id} is now ${r.status}`);
      await after();
    } catch (e) {
      notice(`${action} failed: ${e.message}`, true);
    } finally {
      retry.disabled = resolve.disabled = false;
    }
  };
  retry.addEventListener("click", () => act("retry"));
  resolve.addEventListener("click", () => act("resolve"));
  return h(
    "div",
    { class: "panel actions", "data-id": saga.id },
    h("strong", {}, "Compensation failed. "),
    h("span", {}, "Bind a fixed compensate version, then retry; or resolve by hand."),
    note,
    retry,
    resolve,
    hint,
  );
}

// ---------------------------------------------------------------------------------------------
// /ui/stuck — the COMPENSATION_FAILED queue of every known type.

function stuckPage(main) {
  document.title = "Compensation failed · sagahost";
  const body = h("div", { id: "stuck" });
  append(
    main,
    h("h1", {}, "Compensation failed"),
    h(
      "p",
      { class: "hint" },
      "Sagas whose compensation used up its budget. Fix the cause (bind a working compensate version on the Plugins page or with the CLI), then retry; or resolve by hand with a note. Both are audited.",
    ),
    body,
  );
  // Rows keep their note inputs across polls: a row is rebuilt only when its saga changes.
  const shown = new Map();
  reload = async () => {
    const types = knownTypes();
    const pages = await Promise.all(types.map(stuckOf));
    const sagas = pages.flatMap((p) => p.data).sort((a, b) => (a.updated_at < b.updated_at ? 1 : -1));
    if (sagas.length === 0) {
      shown.clear();
      replace(body, h("p", { class: "empty", id: "stuck-empty" }, `No saga is stuck (types: ${types.join(", ")}).`));
      return;
    }
    let tbody = body.querySelector("tbody");
    if (!tbody) {
      tbody = h("tbody");
      replace(
        body,
        h("p", { class: "notice", id: "stuck-more", hidden: true }),
        h(
          "table",
          { class: "stuck" },
          h("thead", {}, h("tr", {}, ["Saga", "Type", "Reason", "Stuck since", "Action"].map((t) => h("th", {}, t)))),
          tbody,
        ),
      );
    }
    // Past the first pages of a type, say so rather than show a queue that looks complete.
    const cut = pages.filter((p) => p.more).map((p) => p.type);
    const more = body.querySelector("#stuck-more");
    more.hidden = cut.length === 0;
    more.textContent = cut.length
      ? `Showing the first ${STUCK_PAGES * 100} stuck sagas of ${cut.join(", ")}; list them all with \`sagahost sagas list --type TYPE --status COMPENSATION_FAILED --all\`.`
      : "";
    const rows = sagas.map((sg) => {
      const version = `${sg.id}@${sg.updated_at}`;
      if (!shown.has(version)) shown.set(version, stuckRow(sg));
      return shown.get(version);
    });
    for (const k of [...shown.keys()]) if (!rows.includes(shown.get(k))) shown.delete(k);
    tbody.replaceChildren(...rows);
  };
  poll(reload);
}

function stuckRow(sg) {
  const panel = operatorPanel(sg, () => reload());
  return h(
    "tr",
    { "data-id": sg.id },
    h("td", {}, h("a", { href: sagaPath(sg.saga_type, sg.id), class: "saga-link mono" }, sg.id)),
    h("td", {}, sg.saga_type),
    h("td", {}, sg.reason || ""),
    h("td", {}, time(sg.updated_at)),
    h("td", {}, panel),
  );
}

// ---------------------------------------------------------------------------------------------
// /ui/plugins — plugins, their versions, and what each saga step is bound to.

function pluginsPage(main) {
  document.title = "Plugins · sagahost";
  const body = h("div", { id: "plugins" });
  append(main, h("h1", {}, "Plugins and bindings"), body);
  reload = async () => {
    if (!state.adminToken) {
      replace(body, h("p", { class: "empty" }, "Plugins and bindings are admin data: enter the admin token at the top of the page."));
      return;
    }
    const plugins = await loadCatalog();
    const bound = new Map();
    for (const def of state.definitions) {
      for (const st of def.steps) {
        for (const [call, digest] of [["execute", st.execute], ["compensate", st.compensate]]) {
          if (!bound.has(digest)) bound.set(digest, []);
          bound.get(digest).push(`${def.type}/${st.name} ${call}`);
        }
      }
    }
    replace(
      body,
      h("h2", {}, "Bindings"),
      h(
        "table",
        { class: "bindings" },
        h("thead", {}, h("tr", {}, ["Saga type", "Step", "State reached", "Execute", "Compensate", "Timeout", "Retries"].map((t) => h("th", {}, t)))),
        h(
          "tbody",
          {},
          state.definitions.flatMap((def) =>
            def.steps.map((st) =>
              h(
                "tr",
                { "data-binding": `${def.type}/${st.name}` },
                h("td", {}, h("a", { href: `/ui/?type=${encodeURIComponent(def.type)}` }, def.type)),
                h("td", {}, st.name),
                h("td", {}, st.state || ""),
                h("td", {}, digestCell(st.execute)),
                h("td", {}, digestCell(st.compensate)),
                h("td", { class: "num" }, st.timeout_ms ? duration(st.timeout_ms) : ""),
                h("td", { class: "num" }, st.retry ? `${st.retry.max_attempts} / ${st.compensate_retry ? st.compensate_retry.max_attempts : "?"}` : ""),
              ),
            ),
          ),
        ),
      ),
      h("p", { class: "hint" }, "Retries: execute attempts / compensate attempts. Change a binding with PUT /admin/sagas/{type}/steps/{step} or sagahost plugins bind."),
      h("h2", {}, "Plugins"),
      plugins.map((p) =>
        h(
          "div",
          { class: "plugin", "data-plugin": p.name },
          h("h3", {}, p.name),
          h(
            "table",
            {},
            h("thead", {}, h("tr", {}, ["Version", "Digest", "Size", "Uploaded", "WIT", "Outbound HTTP", "Bound to"].map((t) => h("th", {}, t)))),
            h(
              "tbody",
              {},
              p.versions.map((v, i) =>
                h(
                  "tr",
                  {},
                  h("td", {}, `v${i + 1}`),
                  h("td", { class: "digest", title: v.digest }, v.digest),
                  h("td", { class: "num" }, `${(v.size / 1024).toFixed(1)} KiB`),
                  h("td", {}, time(v.uploaded_at)),
                  h("td", {}, v.world || "not loaded here"),
                  h("td", {}, v.outbound_http === null ? "" : v.outbound_http ? "yes" : "no"),
                  h("td", {}, (bound.get(v.digest) || []).join(", ") || "—"),
                ),
              ),
            ),
          ),
        ),
      ),
    );
  };
  poll(reload);
}

// ---------------------------------------------------------------------------------------------
// Start: tokens from the form (memory only), then the page the location names.

function start() {
  $("#credentials").addEventListener("submit", (e) => e.preventDefault());
  let catalogTimer = null;
  const onToken = () => {
    state.adminToken = $("#admin-token").value.trim();
    state.apiToken = $("#api-token").value.trim();
    state.actor = $("#actor").value.trim();
    clearTimeout(catalogTimer);
    catalogTimer = setTimeout(async () => {
      try {
        await loadCatalog();
        notice(null);
      } catch (e) {
        state.definitions = null;
        state.digests = new Map();
        if (state.adminToken) notice(`Admin token: ${e.message}`, true);
      }
      reload().catch((e) => live(false, e.message));
    }, 300);
  };
  for (const id of ["admin-token", "api-token", "actor"]) $("#" + id).addEventListener("input", onToken);
  render();
}

start();
