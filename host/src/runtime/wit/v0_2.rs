//! `sagahost:plugin@0.2.0`, world `step`: the only `bindgen!` for it, and its [`PluginWorld`]
//! and [`Prepared`] implementations.
//!
//! 0.2.0 is 0.1.0 plus `wasi:http/outgoing-handler` (served by wasmtime-wasi-http through the
//! hooks in `outbound.rs`), `call-context.signal-name` and `state.scan`.
//!
//! Owns the conversions between this version's generated types and the host's own. It must
//! not hold host logic: the imports are served by `host.rs`, calls are run by `call.rs`.

use std::sync::Arc;

use wasmtime::component::{InstancePre, Linker};
use wasmtime::Store;

use super::{Answer, Answering, Export, Instance, Instantiating, PluginWorld, Prepared};
use crate::runtime::call::CallState;
use crate::runtime::{host, CallInfo};

mod bindings {
    // Only the exports are generated for use: the imports are defined by hand in `host.rs`,
    // shared by every world version.
    // The wasi packages are wasmtime's own bindings; none of their code is generated here.
    wasmtime::component::bindgen!({
        path: "../wit/0.2.0",
        world: "step",
        exports: { default: async },
        with: {
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        },
    });
}

use bindings::sagahost::plugin::log::Level;
use bindings::{CallContext, StepPre};

/// The world `sagahost:plugin/step@0.2.0`.
pub(super) struct V0_2;

impl PluginWorld for V0_2 {
    fn version(&self) -> &'static str {
        "0.2.0"
    }

    fn grants(&self) -> &'static [&'static str] {
        &["wasi:http/outgoing-handler@0.2.", "wasi:http/types@0.2."]
    }

    fn add_to_linker(&self, linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
        host::add_to_linker::<Level>(linker, self.version(), true)
    }

    fn prepare(&self, pre: InstancePre<CallState>) -> wasmtime::Result<Arc<dyn Prepared>> {
        Ok(Arc::new(Ready::new(StepPre::new(pre)?)))
    }
}

prepared_step!();

fn context(info: &CallInfo) -> CallContext {
    CallContext {
        saga_id: info.saga_id.clone(),
        saga_type: info.saga_type.clone(),
        step: info.step.clone(),
        attempt: info.attempt,
        idempotency_key: info.idempotency_key.clone(),
        signal: info.signal.clone(),
        signal_name: info.signal_name.clone(),
    }
}
