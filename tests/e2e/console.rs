//! The web console (`/ui/`, SPEC §9): its files over HTTP (types, Content-Security-Policy,
//! validators, deep links, 404s), the history route it draws timelines from, and the console
//! itself in headless Chromium driven through chromedriver (fantoccini): the list, a
//! compensated order's timeline, and an operator retrying a COMPENSATION_FAILED saga.
//!
//! The browser tests need `chromium` and `chromedriver` (`scripts/setup --browser` installs
//! Debian's packages; `./scripts/test` runs it). Without them they fail and say so: a console
//! nobody ran in a browser is not tested. `SAGAHOST_CHROMEDRIVER` and `SAGAHOST_CHROMIUM` name
//! other binaries. `SAGAHOST_UPDATE_SCREENSHOTS=1` writes the timeline screenshot to
//! `docs/console-timeline.png` (the README shows it); otherwise it goes to the test's
//! temporary directory, so a test run leaves the checkout as it was.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use sagahost::store::DefinitionSource;
use serde_json::{json, Value};

use crate::harness::{break_payment_compensation, order, TestHost};

const TOKEN: &str = "console-admin-token";

/// A client that does not follow redirects, to see them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test]
async fn the_console_is_served_with_its_types_policy_and_validators() {
    let host = TestHost::start().await;
    let page = host.get("/ui/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.header("content-type").as_deref(), Some("text/html; charset=utf-8"));
    let csp = page.header("content-security-policy").expect("a Content-Security-Policy");
    for directive in
        ["default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]
    {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(page.header("x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(page.header("cache-control").as_deref(), Some("no-cache"));
    let html = String::from_utf8(page.bytes.clone()).unwrap();
    assert!(html.contains("src=\"/ui/app.js\"") && html.contains("href=\"/ui/app.css\""), "{html}");

    for (path, content_type, needle) in [
        ("/ui/app.js", "text/javascript; charset=utf-8", "\"use strict\""),
        ("/ui/app.css", "text/css; charset=utf-8", ":root"),
        ("/ui/icon.svg", "image/svg+xml", "<svg"),
    ] {
        let r = host.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.header("content-type").as_deref(), Some(content_type), "{path}");
        assert!(String::from_utf8_lossy(&r.bytes).contains(needle), "{path}");
        assert!(r.header("content-security-policy").is_some(), "{path}");
        // A matching validator is a 304 without a body; another one gets the file.
        let etag = r.header("etag").unwrap_or_else(|| panic!("{path} has no ETag"));
        let again = host.send(host.client.get(host.url(path)).header("If-None-Match", &etag)).await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{path}");
        assert!(again.bytes.is_empty());
        assert_eq!(again.header("etag"), Some(etag));
        let other = host.send(host.client.get(host.url(path)).header("If-None-Match", "\"stale\"")).await;
        assert_eq!(other.status, StatusCode::OK, "{path}");
    }
    let head = host.send(host.client.head(host.url("/ui/app.js"))).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.bytes.is_empty());

    // `/ui` is the console too, one redirect away.
    let r = no_redirects().get(host.url("/ui")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers()["location"], "/ui/");
    // The console is read-only.
    assert_eq!(host.send(host.client.post(host.url("/ui/"))).await.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn deep_links_are_answered_with_the_page_and_other_paths_with_404() {
    let host = TestHost::start().await;
    let index = host.get("/ui/").await.bytes;
    for path in [
        "/ui/sagas/order/0190f0d2-1a2b-7c3d-8e4f-000000000000",
        "/ui/sagas/order-http/0190f0d2-1a2b-7c3d-8e4f-000000000000",
        "/ui/plugins",
        "/ui/stuck",
        "/ui/?type=order&status=CANCELLED",
    ] {
        let r = host.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.header("content-type").as_deref(), Some("text/html; charset=utf-8"), "{path}");
        assert_eq!(r.bytes, index, "{path} is not the console page");
    }
    // Not a page of the console: the page (which says so) with 404.
    for path in ["/ui/nope", "/ui/sagas/order", "/ui/sagas/Order/x", "/ui/plugins/extra"] {
        let r = host.get(path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.bytes, index, "{path}");
    }
    // A file the console does not have is a plain 404, never the page under a script's name.
    for path in ["/ui/missing.js", "/ui/sagas/order/app.js", "/ui/favicon.ico"] {
        let r = host.get(path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"), "{path}");
    }
}

#[tokio::test]
async fn a_sagas_events_are_its_history_as_published() {
    let host = TestHost::start().await;
    let o = host.run_order(&order("tok_flaky", "SKU-1", "XX")).await;
    assert_eq!(o["status"], "CANCELLED");
    let id = o["id"].as_str().unwrap();
    let r = host.get(&format!("/sagas/order/{id}/events")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    let events = r.json()["data"].as_array().unwrap().clone();
    assert_eq!(events, host.events(id).await, "the route shows the outbox rows as published");
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "OrderCreated",
            "InventoryReserved",
            "StepRetryScheduled",
            "StepRetryScheduled",
            "PaymentCharged",
            "OrderCompensating",
            "StepCompensated",
            "StepCompensated",
            "OrderCancelled"
        ]
    );
    assert_eq!(events[2]["data"]["step"], "payment");
    assert_eq!(events[2]["data"]["attempt"], 1);
    assert!(events[2]["data"]["error"].is_string());
    assert_eq!(events[0]["data"]["input"]["payment"]["token"], "[redacted]", "events are redacted");
    assert_eq!(r.json()["next_cursor"], Value::Null, "one page holds them all");

    // Paged: two at a time, each page after the previous one's cursor, until it is null.
    let (mut paged, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let q = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
        let page = host.get(&format!("/sagas/order/{id}/events?limit=2{q}")).await;
        assert_eq!(page.status, StatusCode::OK);
        let page = page.json();
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 2, "a page holds at most `limit` events: {}", data.len());
        paged.extend(data.iter().cloned());
        assert!(paged.len() <= events.len(), "paging does not end");
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, events, "the pages are the whole history, in order");
    for q in ["limit=0", "limit=1001", "limit=two", "cursor=-1", "cursor=abc", "cursor=1.5"] {
        let r = host.get(&format!("/sagas/order/{id}/events?{q}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(r.json()["error"]["field"], q.split('=').next().unwrap(), "{q}: {}", r.json());
    }

    // Another type's saga, an unknown id, something that is no id: 404.
    for path in [
        format!("/sagas/order-http/{id}/events"),
        "/sagas/order/0190f0d2-1a2b-7c3d-8e4f-000000000000/events".to_owned(),
        "/sagas/order/not-an-id/events".to_owned(),
    ] {
        let r = host.get(&path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.json()["error"]["code"], "not_found");
    }
    let api = host.get("/openapi.json").await.json();
    assert!(api["paths"]["/sagas/{type}/{id}/events"]["get"].is_object(), "the route is in the OpenAPI document");

    // The route is a client route: closed with the others by --api-token.
    let closed = TestHost::start_with(|c| c.api_tokens = vec!["client-token".into()]).await;
    let r = closed.get(&format!("/sagas/order/{id}/events")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // The console itself is not: it holds no data, and asks for the token.
    assert_eq!(closed.get("/ui/").await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// The console in a browser.

/// An executable: `$var` if set, else the first of `names` on `PATH`.
fn executable(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(var) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    names.iter().flat_map(|n| std::env::split_paths(&path).map(move |dir| dir.join(n))).find(|p| p.is_file())
}

/// The port a chromedriver started with `--port=0` listens on, from the line it prints once it
/// does ("ChromeDriver was started successfully on port N."). The rest of its output is
/// drained, so that it never blocks on a full pipe.
async fn driver_port(child: &mut tokio::process::Child) -> u16 {
    use tokio::io::AsyncBufReadExt as _;
    const READY: &str = "started successfully on port ";
    let stdout = child.stdout.take().expect("chromedriver's stdout is piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let port = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.expect("reading chromedriver's output") {
            if let Some((_, rest)) = line.split_once(READY) {
                return rest.trim_end_matches('.').parse::<u16>().ok();
            }
            seen.push(line);
        }
        None
    })
    .await;
    match port {
        Ok(Some(port)) => {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            port
        }
        _ => panic!("chromedriver did not say which port it listens on within 20 s; it printed: {seen:?}"),
    }
}

/// Headless Chromium under its own chromedriver, on a port the system picked; both end with the value.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let driver = executable("SAGAHOST_CHROMEDRIVER", &["chromedriver"]).unwrap_or_else(|| {
            panic!(
                "chromedriver is not installed: the console tests drive headless Chromium through it. \
                 Run scripts/setup --browser (as root: apt-get install chromium chromium-driver), \
                 or point SAGAHOST_CHROMEDRIVER at a chromedriver"
            )
        });
        let chromium = executable("SAGAHOST_CHROMIUM", &["chromium", "chromium-browser", "google-chrome"]);
        // `--port=0`: chromedriver binds a port the system picks and prints it. (A port found by
        // binding one, releasing it and handing it over could be taken in between, and the test
        // would then talk to whatever took it.)
        let mut child = tokio::process::Command::new(&driver)
            .arg("--port=0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start chromedriver at {}: {e}; run scripts/setup --browser (apt-get install chromium \
                     chromium-driver), or point SAGAHOST_CHROMEDRIVER at a chromedriver",
                    driver.display()
                )
            });
        let port = driver_port(&mut child).await;
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while reqwest::get(format!("{url}/status")).await.map(|r| r.status().is_success()).ok() != Some(true) {
            assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not answer on {url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let mut options = json!({
            "args": [
                "--headless=new",
                // Tests run as root in containers, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1400,1400",
                "--hide-scrollbars",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        });
        if let Some(bin) = chromium {
            options["binary"] = json!(bin);
        }
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("chromedriver at {url} could not start Chromium: {e}"));
        Browser { client, _driver: child, _profile: profile }
    }

    /// Waits until the element `css` exists and its text satisfies `ok`; returns the text.
    async fn text_until(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        let mut last = None;
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await {
                if let Ok(text) = el.text().await {
                    if ok(&text) {
                        return text;
                    }
                    last = Some(text);
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                let page = self.client.source().await.unwrap_or_default();
                panic!("{what}: {css} never got there (last text {last:?}); page:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.client.find(Locator::Css(css)).await.unwrap();
        el.clear().await.unwrap();
        el.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        let start = Instant::now();
        loop {
            match self.client.find(Locator::Css(css)).await {
                Ok(el) if el.click().await.is_ok() => return,
                _ if start.elapsed() > Duration::from_secs(30) => panic!("nothing to click at {css}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

#[tokio::test]
async fn in_a_browser_the_console_lists_shows_a_timeline_and_retries_a_stuck_saga() {
    let host = TestHost::start_with(|c| c.admin_token = Some(TOKEN.into())).await;
    // A compensated order: payment fails twice (retryably), then shipment has no carrier, so
    // the charge is refunded and the reservation released.
    // Its customer id is markup: the page must show it as text, never run it.
    let mut body = order("tok_flaky", "SKU-1", "XX");
    body["customer_id"] = json!("<img id=xss src=/nope onerror=alert(1)>");
    let compensated = host.run_order(&body).await;
    assert_eq!(compensated["status"], "CANCELLED");
    let compensated = compensated["id"].as_str().unwrap().to_owned();
    let completed = host.run_order(&order("tok_visa", "SKU-1", "US")).await["id"].as_str().unwrap().to_owned();
    // A stuck one: the refund panics until an operator binds a working compensate.
    let original = break_payment_compensation(&host).await;
    let mut body = order("tok_visa", "SKU-1", "XX");
    body["customer_id"] = json!("compensate-panic");
    let stuck = host.run_order(&body).await;
    assert_eq!(stuck["status"], "COMPENSATION_FAILED", "{stuck:#}");
    let stuck = stuck["id"].as_str().unwrap().to_owned();

    let browser = Browser::start().await;
    let b = &browser.client;

    // The list: every saga, the stuck one flagged in the navigation.
    b.goto(&host.url("/ui/")).await.unwrap();
    browser
        .text_until(&format!("tr[data-id='{compensated}']"), "the compensated order is listed", |t| {
            t.contains("CANCELLED")
        })
        .await;
    browser
        .text_until(&format!("tr[data-id='{completed}']"), "the completed order is listed", |t| t.contains("COMPLETED"))
        .await;
    browser
        .text_until(&format!("tr[data-id='{stuck}']"), "the stuck order is listed", |t| {
            t.contains("COMPENSATION_FAILED")
        })
        .await;
    browser.text_until("#stuck-count", "the navigation counts the stuck saga", |t| t == "1").await;
    // Live: a saga created while the list is open appears in it without a reload.
    let late = host.run_order(&order("tok_decline", "SKU-1", "US")).await["id"].as_str().unwrap().to_owned();
    browser
        .text_until(&format!("tr[data-id='{late}']"), "a new saga shows up by itself", |t| t.contains("CANCELLED"))
        .await;

    // Searching by a whole id opens that saga.
    browser.type_into("#search", &completed).await;
    browser.click("#search-button").await;
    browser.text_until("#saga-status", "the saga found by its id", |t| t == "COMPLETED").await;
    assert_eq!(b.current_url().await.unwrap().path(), format!("/ui/sagas/order/{completed}"));

    // The status filter keeps only the cancelled ones.
    b.goto(&host.url("/ui/?type=order&status=CANCELLED")).await.unwrap();
    browser.text_until(&format!("tr[data-id='{compensated}']"), "filtered list", |t| t.contains("CANCELLED")).await;
    let rows = b.find_all(Locator::Css("table.sagas tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 2, "only the two cancelled orders pass the filter");

    // Open the compensated order from the list: its timeline.
    b.goto(&host.url("/ui/")).await.unwrap();
    browser.click(&format!("tr[data-id='{compensated}'] a.saga-link")).await;
    browser.text_until("#saga-status", "the timeline of the compensated order", |t| t == "CANCELLED").await;
    assert_eq!(b.current_url().await.unwrap().path(), format!("/ui/sagas/order/{compensated}"));
    let events = browser.text_until("table.events", "the events", |t| t.contains("OrderCancelled")).await;
    for needle in ["StepRetryScheduled", "PaymentCharged", "OrderCompensating", "StepCompensated", "no carrier for XX"]
    {
        assert!(events.contains(needle), "{needle} missing from the events:\n{events}");
    }
    assert_eq!(b.find_all(Locator::Css("table.events tbody tr")).await.unwrap().len(), 9);
    let steps = browser.text_until("table.steps", "the steps", |t| t.contains("compensated")).await;
    assert!(steps.contains("sha256:"), "the steps show plugin digests:\n{steps}");
    // The bar chart: execute attempts (two failed), waits, and two compensations.
    let bars = b.find_all(Locator::Css("#timeline-chart rect.bar-compensate")).await.unwrap();
    assert_eq!(bars.len(), 2, "a compensation bar for payment and one for inventory");
    assert!(b.find_all(Locator::Css("#timeline-chart rect.bar-execute.failed")).await.unwrap().len() >= 2);
    let reason = browser.text_until("#saga-reason", "the reason", |t| !t.is_empty()).await;
    assert_eq!(reason, "shipment: no carrier for XX");
    let png = b.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG screenshot");
    let shot = if std::env::var("SAGAHOST_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/console-timeline.png")
    } else {
        host.dir.path().join("console-timeline.png")
    };
    std::fs::write(&shot, &png).unwrap();
    assert!(b.find_all(Locator::Css("img")).await.unwrap().is_empty(), "markup from the input became an element");
    b.find(Locator::Css("#saga-input summary")).await.unwrap().click().await.unwrap();
    browser.text_until("#saga-input pre", "the input, as text", |t| t.contains("<img id=xss")).await;

    // A deep link opened directly: the stuck saga's timeline, with the operator's actions.
    b.goto(&host.url(&format!("/ui/sagas/order/{stuck}"))).await.unwrap();
    browser.text_until("#saga-status", "the stuck saga's timeline", |t| t == "COMPENSATION_FAILED").await;
    browser.text_until("#saga-ops", "the operator panel", |t| t.contains("Retry compensation")).await;
    browser.text_until("table.events", "the failed compensation", |t| t.contains("OrderCompensationFailed")).await;

    // Plugins and bindings need the admin token, typed into the page.
    b.goto(&host.url("/ui/plugins")).await.unwrap();
    browser.text_until("#plugins", "plugins without a token", |t| t.contains("admin token")).await;
    browser.type_into("#admin-token", TOKEN).await;
    browser.type_into("#actor", "ada@console").await;
    let plugins =
        browser.text_until("#plugins", "plugins with the token", |t| t.contains("Bindings") && t.contains("v2")).await;
    for needle in ["inventory", "payment", "shipment", "order/payment compensate"] {
        assert!(plugins.contains(needle), "{needle} missing from the plugins page:\n{plugins}");
    }

    // Fix the compensation (bind the working version again), then retry from the queue; the
    // token typed above is still in the page's memory, as navigation does not reload it.
    host.catalog.put_definition(original, DefinitionSource::Admin).await.unwrap();
    browser.click("#nav-stuck").await;
    browser
        .text_until(&format!("#stuck tr[data-id='{stuck}']"), "the queue", |t| t.contains("no carrier for XX"))
        .await;
    browser.type_into(&format!("#stuck tr[data-id='{stuck}'] input.note"), "bound the fixed refund").await;
    browser.click(&format!("#stuck tr[data-id='{stuck}'] button.retry")).await;
    browser.text_until("#notice", "the retry is accepted", |t| t.contains("Retry accepted")).await;
    browser.text_until("#stuck", "the queue empties", |t| t.contains("No saga is stuck")).await;

    // The saga ends CANCELLED, in the page and in the API, with the refund done once.
    b.goto(&host.url(&format!("/ui/sagas/order/{stuck}"))).await.unwrap();
    browser.text_until("#saga-status", "the retried saga", |t| t == "CANCELLED").await;
    browser.text_until("table.events", "the retry in the history", |t| t.contains("CompensationRetried")).await;
    let o = host.wait_settled(&stuck).await;
    assert_eq!(o["status"], "CANCELLED");
    assert_eq!(host.state("payment", &format!("charge/{stuck}")).await.unwrap()["status"], "refunded");
    let audit: Value =
        host.send(host.client.get(host.url(&format!("/admin/audit?target={stuck}"))).bearer_auth(TOKEN)).await.json();
    assert_eq!(audit["data"][0]["action"], "saga.retry");
    assert_eq!(audit["data"][0]["actor"], "ada@console");
    assert_eq!(audit["data"][0]["note"], "bound the fixed refund");

    // A pasted link with a broken escape is no page, said so (it was a script error and an
    // empty page).
    b.goto(&host.url("/ui/sagas/order/%zz")).await.unwrap();
    browser.text_until("#main h1", "the not-found page", |t| t == "No such page").await;
    b.clone().close().await.unwrap();
}
