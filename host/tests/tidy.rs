//! Architecture invariants, checked on the source text (rust-analyzer's `tidy` tests are the
//! model): each rule names the one place a concern may live, and fails with every offending
//! line. See the "Invariants" section of ARCHITECTURE.md.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `host/src`, with its path relative to `host/src`.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("host/src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files.sort();
    assert!(files.len() > 20, "found only {} source files under {}", files.len(), root.display());
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&root).unwrap().to_string_lossy().replace('\\', "/");
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// The lines of production code (comments and the trailing `#[cfg(test)]` module dropped)
/// of `text` that contain any of `needles`.
fn hits(text: &str, needles: &[&str]) -> Vec<(usize, String)> {
    text.lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .enumerate()
        .filter(|(_, line)| {
            let code = line.trim_start();
            !code.starts_with("//") && needles.iter().any(|n| code.contains(n))
        })
        .map(|(i, line)| (i + 1, line.trim().to_owned()))
        .collect()
}

/// Fails listing every line outside `allowed` (path prefixes) that contains a needle.
fn only_in(rule: &str, allowed: &[&str], needles: &[&str]) {
    let mut offences = Vec::new();
    for (path, text) in sources() {
        // Test modules (`tests.rs`, `*/tests/*`) set up what they check by any means.
        if allowed.iter().any(|a| path.starts_with(a)) || path.ends_with("tests.rs") || path.contains("/tests/") {
            continue;
        }
        for (line, code) in hits(&text, needles) {
            offences.push(format!("  host/src/{path}:{line}: {code}"));
        }
    }
    assert!(offences.is_empty(), "{rule}; found:\n{}", offences.join("\n"));
}

#[test]
fn only_the_store_contains_sql() {
    only_in(
        "architecture invariant: only store/ contains SQL and names sqlx",
        // main.rs names sqlx only as a log target in the default log filter.
        &["store/", "main.rs"],
        &["sqlx", "SELECT ", "INSERT INTO", "UPDATE ", "DELETE FROM", "CREATE TABLE"],
    );
}

#[test]
fn only_the_runtime_names_wasmtime() {
    only_in("architecture invariant: only runtime/ names wasmtime types", &["runtime/"], &["wasmtime"]);
}

#[test]
fn the_engine_does_no_io_reads_no_clock_and_imports_no_web_crate() {
    let forbidden = [
        "std::fs",
        "std::net",
        "std::io",
        "std::time",
        "std::thread",
        "std::env",
        "Instant",
        "SystemTime",
        "tokio",
        "chrono",
        "rand::",
        "uuid",
        "axum",
        "utoipa",
        "sqlx",
        "wasmtime",
        "rdkafka",
        "tracing",
        "crate::store",
        "crate::http",
        "crate::runtime",
        "crate::driver",
        "crate::clock",
    ];
    let mut offences = Vec::new();
    for (path, text) in sources().into_iter().filter(|(p, _)| p.starts_with("engine/")) {
        for (line, code) in hits(&text, &forbidden) {
            offences.push(format!("  host/src/{path}:{line}: {code}"));
        }
    }
    assert!(offences.is_empty(), "architecture invariant: the engine is pure; found:\n{}", offences.join("\n"));
}

#[test]
fn only_the_saga_service_applies_events_and_commits_transitions() {
    only_in(
        "architecture invariant: every saga change goes through saga.rs (one way in)",
        &["saga.rs", "engine/", "store/"],
        &["engine::apply(", ".commit(&", ".create_saga("],
    );
}

#[test]
fn the_generic_host_names_no_builtin_saga_type() {
    only_in("the generic host knows no saga type by name; built-ins live in builtin/", &["builtin/"], &["\"order\""]);
}

/// Fails listing every line under `dir` that reaches into the host's internals: `dir` is a
/// client of the host, which it reaches over HTTP only.
fn only_a_client(dir: &str, rule: &str) {
    let internals = [
        "crate::store",
        "crate::runtime",
        "crate::driver",
        "crate::saga",
        "crate::engine",
        "crate::catalog",
        "crate::http",
        "crate::relay",
        "crate::App",
        "crate::Config",
    ];
    let mut offences = Vec::new();
    for (path, text) in sources().into_iter().filter(|(p, _)| p.starts_with(dir)) {
        for (line, code) in hits(&text, &internals) {
            offences.push(format!("  host/src/{path}:{line}: {code}"));
        }
    }
    assert!(offences.is_empty(), "{rule}; found:\n{}", offences.join("\n"));
}

#[test]
fn the_load_generator_is_only_a_client_of_the_host() {
    // `sagahost bench` measures a deployment through its public API, as a user's own tool
    // would; reaching into the host's internals would measure something no client sees.
    only_a_client("bench/", "bench/ reaches the host over HTTP only");
}

#[test]
fn the_operator_cli_is_only_a_client_of_the_host() {
    // `sagahost orders|plugins|sagas|audit` act on a running host, maybe on another machine:
    // only what the HTTP API offers exists for them, so the API stays enough to operate it.
    only_a_client("cli/", "cli/ reaches the host over HTTP only");
}

#[test]
fn the_console_only_serves_files() {
    // The web console is a client of the public API like any other: its module serves the
    // embedded files and reads nothing of the host's state, so the console can show nothing
    // (and change nothing) that the API does not.
    let state =
        ["AppState", "State(", "crate::store", "crate::saga", "crate::catalog", "crate::driver", "crate::runtime"];
    let (_, text) = sources().into_iter().find(|(p, _)| p == "http/ui.rs").expect("http/ui.rs exists");
    let offences: Vec<String> =
        hits(&text, &state).into_iter().map(|(l, c)| format!("  host/src/http/ui.rs:{l}: {c}")).collect();
    assert!(offences.is_empty(), "http/ui.rs serves files only; found:\n{}", offences.join("\n"));
}

#[test]
fn the_javascript_payment_step_builds_as_a_new_project_does() {
    // plugins/js/payment is built by the template's own build script, so the step the
    // end-to-end tests hold to the demo checks is built the way authors' steps are: the two
    // copies (a project made by `plugin new` carries its own) must not drift apart.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let read = |p: &str| std::fs::read_to_string(format!("{root}/{p}")).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert!(
        read("plugins/js/payment/build.mjs") == read("plugins/templates/js/build.mjs"),
        "plugins/js/payment/build.mjs differs from plugins/templates/js/build.mjs; copy the template's over it"
    );
}

#[test]
fn the_rules_above_can_fail() {
    // A check that cannot fail checks nothing: feed the matcher a line it must catch, and a
    // comment it must skip.
    let text = "fn f() {\n    sqlx::query(\"SELECT 1\");\n}\n// sqlx in a comment\n#[cfg(test)]\nmod tests { sqlx }\n";
    assert_eq!(hits(text, &["sqlx"]), vec![(2, "sqlx::query(\"SELECT 1\");".to_owned())]);
}
