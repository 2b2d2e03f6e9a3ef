//! The import policy: which capabilities a plugin may ask for, checked at load time.
//!
//! Owns [`GRANTED_IMPORTS`] and the check against it. It must not link or instantiate
//! anything: a component that fails here is refused before it reaches the linker, so a plugin
//! cannot even ask for a capability the host does not grant.
//!
//! Why `wasi:random` is granted although SPEC §4 grants nothing beyond the world: Rust's
//! standard library imports `wasi:random/insecure-seed` as soon as a plugin (or any crate it
//! uses) builds a `HashMap` with the default hasher, and refusing it would refuse most real
//! plugins. Randomness gives a plugin no access to anything outside its call; it only makes
//! the call non-deterministic, which the plugin guide warns about (derive ids from the input
//! and the saga id, never from random numbers or the time).

use wasmtime::component::Component;
use wasmtime::Engine;

use super::LoadError;

/// Imports a plugin may have, as name prefixes. The `sagahost:plugin` interfaces are the
/// contract (which version of it a component targets is settled in `wit/`); the WASI pieces
/// are what Rust's standard library links (streams, an empty environment, exit, stdio, the
/// random seed of `HashMap`) and grant nothing with our empty `WasiCtx`. Everything else
/// (files, sockets, clocks, HTTP, unknown functions) is refused.
pub(super) const GRANTED_IMPORTS: &[&str] = &[
    "sagahost:plugin/",
    "wasi:io/",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-",
    "wasi:random/",
];

/// Is this a component (not a core module)? The preamble's layer field says: the first 8
/// bytes are `\0asm`, a 16-bit version and a 16-bit layer, which is 1 for components.
pub(super) fn is_component(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[0..4] == b"\0asm" && bytes[6..8] == [1, 0]
}

/// Checks a component's imports against [`GRANTED_IMPORTS`] plus the `extra` prefixes the
/// world it targets grants (none for `sagahost:plugin@0.1.0`).
pub(super) fn check_imports(engine: &Engine, component: &Component, extra: &[&str]) -> Result<(), LoadError> {
    let ty = component.component_type();
    let names: Vec<&str> = ty.imports(engine).map(|(name, _)| name).collect();
    let refused = refused(&names, extra);
    if refused.is_empty() {
        return Ok(());
    }
    Err(LoadError::WrongWorld(format!(
        "it imports {}, which the host does not grant; plugins may import only the sagahost:plugin interfaces \
         and the WASI streams, environment, exit, stdio and random interfaces Rust's std links (no files, sockets or clocks)",
        refused.join(", ")
    )))
}

/// Does the component import `wasi:http/outgoing-handler` (so it can make requests)?
pub(super) fn imports_http(engine: &Engine, component: &Component) -> bool {
    component.component_type().imports(engine).any(|(name, _)| name.starts_with("wasi:http/outgoing-handler@"))
}

/// The import names that no granted prefix covers, in the component's order.
fn refused<'a>(names: &[&'a str], extra: &[&str]) -> Vec<&'a str> {
    names.iter().copied().filter(|name| !GRANTED_IMPORTS.iter().chain(extra).any(|p| name.starts_with(p))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_and_the_wasi_pieces_std_links_are_granted() {
        let names = [
            "sagahost:plugin/state@0.1.0",
            "sagahost:plugin/log@0.1.0",
            "wasi:io/streams@0.2.6",
            "wasi:cli/stderr@0.2.6",
            "wasi:random/insecure-seed@0.2.6",
        ];
        assert!(refused(&names, &[]).is_empty());
    }

    #[test]
    fn files_sockets_clocks_http_and_unknown_imports_are_refused() {
        let names = [
            "wasi:clocks/wall-clock@0.2.6",
            "wasi:clocks/monotonic-clock@0.2.6",
            "wasi:filesystem/types@0.2.6",
            "wasi:sockets/tcp@0.2.6",
            "wasi:http/outgoing-handler@0.2.6",
            "steal-secret",
            "wasi:io/streams@0.2.6",
        ];
        assert_eq!(refused(&names, &[]), &names[..6]);
        // A world may grant more (0.2.0 will grant outgoing HTTP); nothing else moves.
        assert_eq!(refused(&names, &["wasi:http/outgoing-handler"]).len(), 5);
    }

    #[test]
    fn only_components_pass_the_preamble_check() {
        assert!(!is_component(b"not wasm at all"));
        assert!(!is_component(b"\0asm\x01\0\0\0"), "a core module");
        assert!(is_component(b"\0asm\x0d\0\x01\0"));
    }
}
