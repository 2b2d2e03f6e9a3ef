//! `sagahost:plugin@0.1.0`, world `step`: the only `bindgen!` for it, and its [`PluginWorld`]
//! and [`Prepared`] implementations.
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
    wasmtime::component::bindgen!({
        path: "../wit/0.1.0",
        world: "step",
        exports: { default: async },
    });
}

use bindings::sagahost::plugin::log::Level;
use bindings::{CallContext, StepPre};

/// The world `sagahost:plugin/step@0.1.0`.
pub(super) struct V0_1;

impl PluginWorld for V0_1 {
    fn version(&self) -> &'static str {
        "0.1.0"
    }

    fn add_to_linker(&self, linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
        host::add_to_linker::<Level>(linker, self.version(), false)
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
    }
}
