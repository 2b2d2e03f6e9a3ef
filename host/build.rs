//! Builds the demo plugins (the `plugins/` workspace, for wasm32-wasip2) and hands the six
//! built-in components (`order`'s and `order-http`'s) to the host crate through OUT_DIR, where `builtin::order` embeds them.
//!
//! The plugins build in their own target directory (`plugins/target`), so this nested cargo
//! never contends with the outer build's lock.

use std::path::PathBuf;
use std::process::Command;

fn main() {
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
    for name in ["inventory", "payment", "shipment", "http_inventory", "http_payment", "http_shipment"] {
        let built = target_dir.join("wasm32-wasip2/release").join(format!("{name}.wasm"));
        std::fs::copy(&built, out.join(format!("{name}.wasm")))
            .unwrap_or_else(|e| panic!("demo plugin {} is missing after the build: {e}", built.display()));
    }
}
