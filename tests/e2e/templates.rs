//! `sagahost plugin new`: a new step project, outside this repository, that builds with its
//! template's one command into a component the host's own checker accepts and runs. The
//! projects live in a temporary directory; their build output goes to a directory under the
//! test target's tmp dir, so a second run reuses the compiled dependencies.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::process::{plugin_run, run_command, Run};

/// Runs `program ARGS` in `dir` to its end (at most 20 minutes: a first build fetches and
/// compiles its dependencies), `env` added.
async fn run_in(dir: &Path, program: &str, args: &[&str], env: &[(&str, String)]) -> Run {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).current_dir(dir).kill_on_drop(true);
    // What the outer cargo sets for the test build must not steer the project's own build.
    for var in
        ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTC_WORKSPACE_WRAPPER", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR"]
    {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let out = tokio::time::timeout(Duration::from_secs(1200), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} in {} did not end within 20 minutes", dir.display()))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A directory for a template's build output that outlives the test.
fn build_cache(lang: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_TARGET_TMPDIR"), "/templates")).join(lang)
}

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `plugin check` accepts the component and one `plugin run` of the template's execute does
/// what every template's step does: `done` with an output naming the saga, and one state
/// write; its compensate succeeds.
async fn check_and_run(wasm: &Path) {
    let wasm = wasm.to_str().unwrap();
    let check = run_command(&["plugin", "check", wasm, "--json"], &[]).await.exits(0);
    assert_eq!(check.json()["valid"], true, "{check:#?}");
    let input = r#"{"input": {"customer_id": "c-1", "note": "x"}}"#;
    let run = plugin_run(&[wasm, "--input", input, "--saga-id", "s-9", "--json"]).await.exits(0);
    let r = run.json();
    assert_eq!(r["outcome"], "done", "{r:#}");
    assert_eq!(r["output"]["saga_id"], "s-9", "{r:#}");
    assert_eq!(r["state_writes"].as_array().map(Vec::len), Some(1), "{r:#}");
    let output = r["output"].to_string();
    let undo =
        plugin_run(&[wasm, "--call", "compensate", "--input", r#"{"input": {}}"#, "--output", &output, "--json"])
            .await
            .exits(0);
    assert_eq!(undo.json()["outcome"], "done", "{undo:#?}");
}

/// Is `program` on PATH? A template test skips (saying so) only when its toolchain is absent:
/// scripts/setup installs Node.js and Python where it can.
fn have(program: &str) -> bool {
    let found = std::process::Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: {program} is not installed, so this template cannot be built here");
    }
    found
}

/// `plugin new NAME --lang LANG` in a temporary directory, then the template's one build
/// command (which its README names), then `check_and_run` on the component it writes as
/// NAME.wasm. Skipped, saying so, when `tool` is not installed.
async fn a_new_step_builds_with_one_command(lang: &str, tool: &str, build: &[&str]) {
    if !have(tool) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let name = format!("gift-{lang}");
    let dir = root.path().join(&name);
    run_command(&["plugin", "new", &name, "--lang", lang, "--dir", dir.to_str().unwrap()], &[]).await.exits(0);
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(readme.contains(&build.join(" ")), "{readme}");
    let built = run_in(&dir, build[0], &build[1..], &[]).await;
    // Exit 3: the toolchain is here but too old (Node.js before 20, Python before 3.10 or
    // without venv), which the build says; skipped as for one that is absent.
    if built.code == 3 {
        eprintln!("SKIPPED: the {lang} template's toolchain is too old here: {}", built.stderr.trim());
        return;
    }
    assert_eq!(built.code, 0, "{built:#?}");
    check_and_run(&dir.join(format!("{name}.wasm"))).await;
}

#[tokio::test]
async fn a_new_javascript_step_builds_with_one_command_and_runs() {
    a_new_step_builds_with_one_command("js", "npm", &["npm", "run", "build"]).await;
}

#[tokio::test]
async fn a_new_python_step_builds_with_one_command_and_runs() {
    a_new_step_builds_with_one_command("python", "python3", &["bash", "build.sh"]).await;
}

#[tokio::test]
async fn a_new_rust_step_builds_outside_the_repository_by_sdk_path_and_git() {
    let root = tempfile::tempdir().unwrap();
    let sdk = repo().join("plugins/sdk");
    let target = build_cache("rust");
    let env = [("CARGO_TARGET_DIR", target.display().to_string())];
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    // By path: the one build command of the template's README, then its own unit tests.
    let dir = root.path().join("gift-wrap");
    run_command(
        &[
            "plugin",
            "new",
            "gift-wrap",
            "--lang",
            "rust",
            "--dir",
            dir.to_str().unwrap(),
            "--sdk-path",
            sdk.to_str().unwrap(),
        ],
        &[],
    )
    .await
    .exits(0);
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(readme.contains("cargo build --release --target wasm32-wasip2"), "{readme}");
    let build = run_in(&dir, &cargo, &["build", "--release", "--target", "wasm32-wasip2"], &env).await;
    assert_eq!(build.code, 0, "{build:#?}");
    check_and_run(&target.join("wasm32-wasip2/release/gift_wrap.wasm")).await;
    let host = run_in(&dir, "rustc", &["-vV"], &[]).await.stdout;
    let triple = host.lines().find_map(|l| l.strip_prefix("host: ")).unwrap().to_owned();
    let tests = run_in(&dir, &cargo, &["test", "--target", &triple], &env).await;
    assert_eq!(tests.code, 0, "{tests:#?}");
    assert!(tests.stdout.contains("2 passed"), "{}", tests.stdout);

    // By git: the repository's committed SDK, as a team outside it would depend on it.
    let dir = root.path().join("gift-tag");
    let url = format!("file://{}", std::fs::canonicalize(repo()).unwrap().display());
    run_command(
        &["plugin", "new", "gift-tag", "--lang", "rust", "--dir", dir.to_str().unwrap(), "--sdk-git", &url],
        &[],
    )
    .await
    .exits(0);
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains(&format!("sagahost-plugin-sdk = {{ git = \"{url}\" }}")), "{manifest}");
    let build = run_in(&dir, &cargo, &["build", "--release", "--target", "wasm32-wasip2"], &env).await;
    assert_eq!(build.code, 0, "{build:#?}");
    check_and_run(&target.join("wasm32-wasip2/release/gift_tag.wasm")).await;
}

#[tokio::test]
async fn plugin_new_refuses_bad_names_and_never_writes_over_a_project() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("taken");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    let d = dir.to_str().unwrap();

    let bad = run_command(&["plugin", "new", "Bad Name", "--lang", "js", "--dir", d], &[]).await.exits(2);
    assert!(bad.stderr.contains("invalid plugin name 'Bad Name'"), "{bad:#?}");
    let taken = run_command(&["plugin", "new", "taken", "--lang", "python", "--dir", d], &[]).await.exits(2);
    assert!(taken.stderr.contains("already exists and is not empty"), "{taken:#?}");
    let wrong =
        run_command(&["plugin", "new", "x", "--lang", "js", "--dir", d, "--sdk-path", "/tmp"], &[]).await.exits(2);
    assert!(wrong.stderr.contains("apply to --lang rust only"), "{wrong:#?}");
    let unknown = run_command(&["plugin", "new", "x", "--lang", "cobol"], &[]).await.exits(2);
    assert!(unknown.stderr.contains("rust, js, python"), "{unknown:#?}");
    let entries: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("taken")], "nothing else was written");
    assert_eq!(std::fs::read_to_string(dir.join("keep.txt")).unwrap(), "mine");

    // JavaScript and Python projects carry the WIT their toolchains read.
    let js = root.path().join("js-step");
    run_command(&["plugin", "new", "js-step", "--lang", "js", "--dir", js.to_str().unwrap()], &[]).await.exits(0);
    let wit = std::fs::read_to_string(js.join("wit/step.wit")).unwrap();
    assert!(wit.contains("package sagahost:plugin@0.2.0;"));
    assert!(js.join("wit/deps/http.wit").is_file());
}

/// `plugin new NAME --dir .` (or `./`) in the empty directory the shell is in fills that
/// directory in place: it stays the same directory (same inode), so the shell's current
/// directory stays valid, and nothing is staged next to it.
#[tokio::test]
async fn plugin_new_fills_the_empty_current_directory_in_place() {
    use std::os::unix::fs::MetadataExt as _;

    let root = tempfile::tempdir().unwrap();
    let sagahost = crate::process::binary();
    let sagahost = sagahost.to_str().unwrap();
    for (name, dir) in [("here-dot", "."), ("here-slash", "./")] {
        let here = root.path().join(name);
        std::fs::create_dir(&here).unwrap();
        let inode = std::fs::metadata(&here).unwrap().ino();
        let args = ["plugin", "new", name, "--lang", "js", "--dir", dir];
        let new = run_in(&here, sagahost, &args, &[]).await;
        assert_eq!(new.code, 0, "--dir {dir}: {new:#?}");
        assert_eq!(std::fs::metadata(&here).unwrap().ino(), inode, "--dir {dir} replaced the directory");
        assert!(here.join("step.js").is_file() && here.join("wit/step.wit").is_file(), "--dir {dir}");
        let staged: Vec<_> = std::fs::read_dir(&here)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".sagahost-new-"))
            .collect();
        assert!(staged.is_empty(), "--dir {dir} left {staged:?}");
        // Not empty any more: a second run is refused.
        let again = run_in(&here, sagahost, &args, &[]).await;
        assert_eq!(again.code, 2, "{again:#?}");
        assert!(again.stderr.contains("already exists and is not empty"), "{again:#?}");
    }
    let mut entries: Vec<_> =
        std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    entries.sort();
    assert_eq!(entries, ["here-dot", "here-slash"], "nothing was staged next to them");
}

/// `--sdk-rev`, `--sdk-branch` and `--sdk-tag` become cargo's `rev`, `branch` and `tag` (cargo
/// resolves no branch given as `rev`); only one of them, and only with `--sdk-git`.
#[tokio::test]
async fn plugin_new_pins_a_git_sdk_by_rev_branch_or_tag() {
    let root = tempfile::tempdir().unwrap();
    let url = "https://example.com/sagahost.git";
    for (flag, value, key) in
        [("--sdk-rev", "0a1b2c3d", "rev"), ("--sdk-branch", "main", "branch"), ("--sdk-tag", "v0.2.0", "tag")]
    {
        let dir = root.path().join(key);
        let d = dir.to_str().unwrap();
        run_command(&["plugin", "new", "pinned", "--lang", "rust", "--dir", d, "--sdk-git", url, flag, value], &[])
            .await
            .exits(0);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        let line = format!("sagahost-plugin-sdk = {{ git = \"{url}\", {key} = \"{value}\" }}");
        assert!(manifest.lines().any(|l| l == line), "{line} not in {manifest}");
    }
    let d = root.path().join("both");
    let d = d.to_str().unwrap();
    let both = run_command(
        &["plugin", "new", "x", "--lang", "rust", "--dir", d, "--sdk-git", url, "--sdk-rev", "a", "--sdk-branch", "b"],
        &[],
    )
    .await
    .exits(2);
    assert!(both.stderr.contains("cannot be used with"), "{both:#?}");
    let alone =
        run_command(&["plugin", "new", "x", "--lang", "rust", "--dir", d, "--sdk-tag", "v1"], &[]).await.exits(2);
    assert!(alone.stderr.contains("--sdk-git"), "{alone:#?}");
    assert!(!root.path().join("both").exists());
}
