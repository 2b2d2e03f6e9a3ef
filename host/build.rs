//! Builds the demo plugins (the `plugins/` workspace, for wasm32-wasip2) and hands the six
//! built-in components (`order`'s and `order-http`'s) to the host crate through OUT_DIR, where `builtin::order` embeds them.
//!
//! The plugins build in their own target directory (`plugins/target`), so this nested cargo
//! never contends with the outer build's lock.
//!
//! It also lists the files of the plugin templates (`plugins/templates/<lang>/`) and of the
//! current WIT package (`wit/0.2.0/`) into OUT_DIR/templates.rs, which `scaffold` embeds for
//! `sagahost plugin new`: a file added to a template is picked up without a code change.
//!
//! On Linux it links the binaries with their segments aligned to 2 MiB, so that a kernel that
//! can back executable files with huge pages (a tmpfs mounted `huge=always`, or
//! `CONFIG_READ_ONLY_THP_FOR_FS`) can map the host's code with them: README, "Running it".

use std::path::PathBuf;
use std::process::Command;

fn main() {
    huge_page_aligned_binaries();
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("host/ lives in the workspace root").to_path_buf();
    let plugins = root.join("plugins");
    for watched in [
        "wit",
        "plugins/Cargo.toml",
        "plugins/Cargo.lock",
        "plugins/sdk",
        "plugins/inventory",
        "plugins/payment",
        "plugins/shipment",
        "plugins/http-inventory",
        "plugins/http-payment",
        "plugins/http-shipment",
        "plugins/fixtures",
        "plugins/templates",
    ] {
        // Relative to this package, so cargo resolves them in whichever checkout builds: a
        // target directory shared by several clones (CI's cache) must not keep watching the
        // clone that built first.
        println!("cargo:rerun-if-changed=../{watched}");
    }
    let target_dir = plugins.join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .current_dir(&plugins)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--workspace"])
        .env("CARGO_TARGET_DIR", &target_dir)
        // Flags meant for the host build must not leak into the wasm build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .expect("failed to run cargo for the plugins workspace");
    if !status.success() {
        panic!(
            "building the demo plugins failed (see above). If the target is missing, run \
             `rustup target add wasm32-wasip2`, or use ./scripts/serve and ./scripts/test, which do it for you"
        );
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    write_template_list(&root, &out);
    for name in ["inventory", "payment", "shipment", "http_inventory", "http_payment", "http_shipment"] {
        let built = target_dir.join("wasm32-wasip2/release").join(format!("{name}.wasm"));
        std::fs::copy(&built, out.join(format!("{name}.wasm")))
            .unwrap_or_else(|e| panic!("demo plugin {} is missing after the build: {e}", built.display()));
    }
}

/// Directories and files of a template checkout that are build output, never template.
fn is_build_output(name: &str) -> bool {
    matches!(name, "target" | "node_modules" | "__pycache__" | ".venv" | "venv" | "dist")
        || name.ends_with(".wasm")
        || name.ends_with(".pyc")
}

/// Every file under `dir`, as its path relative to `dir` with `/`, sorted.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![(String::new(), dir.to_path_buf())];
    while let Some((prefix, at)) = pending.pop() {
        let entries = std::fs::read_dir(&at).unwrap_or_else(|e| panic!("cannot list {}: {e}", at.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", at.display()));
            let name = entry.file_name().into_string().expect("template file names are UTF-8");
            if is_build_output(&name) {
                continue;
            }
            let relative = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let path = entry.path();
            if path.is_dir() {
                pending.push((relative, path));
            } else {
                found.push(relative);
            }
        }
    }
    found.sort();
    found
}

/// `include_str!` of a file given relative to the workspace root, resolved against the host
/// package of whichever checkout compiles the generated code, never an absolute path: a target
/// directory shared by several clones (CI's cache) may skip this script in a later clone, and
/// the generated file must not point into a clone that has since been deleted.
fn embed(from_root: &str) -> String {
    format!("include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {:?}))", format!("/../{from_root}"))
}

/// OUT_DIR/templates.rs: `TEMPLATES` (language, relative path, contents) and `WIT` (relative
/// path, contents), each file embedded with `include_str!`.
fn write_template_list(root: &std::path::Path, out: &std::path::Path) {
    let mut code = String::from("/// (language, path in the new project, contents) of every template file.\n");
    code.push_str("pub const TEMPLATES: &[(&str, &str, &str)] = &[\n");
    let templates = root.join("plugins/templates");
    let mut languages: Vec<_> = std::fs::read_dir(&templates)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", templates.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().into_string().expect("template names are UTF-8"))
        .collect();
    languages.sort();
    for language in &languages {
        for relative in files_under(&templates.join(language)) {
            let embedded = embed(&format!("plugins/templates/{language}/{relative}"));
            code.push_str(&format!("    ({language:?}, {relative:?}, {embedded}),\n"));
        }
    }
    code.push_str(
        "];\n/// (path under wit/, contents) of the current WIT package.\npub const WIT: &[(&str, &str)] = &[\n",
    );
    for relative in files_under(&root.join("wit/0.2.0")) {
        code.push_str(&format!("    ({relative:?}, {}),\n", embed(&format!("wit/0.2.0/{relative}"))));
    }
    code.push_str("];\n");
    std::fs::write(out.join("templates.rs"), code).expect("cannot write OUT_DIR/templates.rs");
}

/// Segments aligned to 2 MiB in the file and in memory alike (`max-page-size`): the kernel maps
/// file pages with a huge page only where the address and the file offset agree modulo 2 MiB.
/// Costs nothing else: the file keeps its size, only the gaps between segments in the address
/// space grow. Measured on this project's VM (BENCHMARKS.md, sessions 17-18): with the code on
/// huge pages a plugin call at 100 sagas/s took 6-35% less, because after an idle gap every 4 KiB
/// page of code a call touches costs a page walk. Binaries only: tests and libraries are
/// linked as before.
fn huge_page_aligned_binaries() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        for arg in ["-Wl,-z,max-page-size=0x200000", "-Wl,-z,common-page-size=0x200000"] {
            println!("cargo:rustc-link-arg-bins={arg}");
        }
    }
}
