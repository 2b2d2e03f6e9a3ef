//! The versions of the `sagahost:plugin` world this host serves, behind two small traits.
//!
//! [`PluginWorld`] is one version of the world: its name, what it adds to the linker, and how
//! it turns a linked component into a [`Prepared`] one. [`Prepared`] instantiates and calls
//! `execute` or `compensate`, converting the world's generated types to and from the host's
//! own ([`CallInfo`], [`Answer`]). The call path sees only these traits, so serving another
//! version is one more module with one more `bindgen!`, plus one entry in [`WORLDS`].
//!
//! This module and its children must not decide anything about a call's outcome (limits,
//! timeouts, output checks): they translate.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Engine, Store};

use super::call::CallState;
use super::{CallInfo, LoadError};

/// The glue every version module needs, identical but for the generated types it names: a
/// `Ready` component behind [`Prepared`] (instantiate, call the export, convert the answer)
/// and the conversions of `step-error` and `log.level`. Expanded inside a version module,
/// after its `bindings` and a `fn context(&CallInfo) -> CallContext`.
macro_rules! prepared_step {
    () => {
        /// A component of this version with its exports checked.
        struct Ready {
            pre: bindings::StepPre<CallState>,
            /// Set once an instantiation ahead of a call called the host (`spare.rs`).
            no_spares: std::sync::atomic::AtomicBool,
        }

        impl Ready {
            fn new(pre: bindings::StepPre<CallState>) -> Ready {
                Ready { pre, no_spares: std::sync::atomic::AtomicBool::new(false) }
            }
        }

        /// An instance of this version's component, in the store it was made in.
        struct Live(bindings::Step);

        impl Prepared for Ready {
            fn instantiate<'a>(&'a self, store: &'a mut Store<CallState>) -> Instantiating<'a> {
                Box::pin(async move {
                    let step = self.pre.instantiate_async(&mut *store).await?;
                    Ok(Box::new(Live(step)) as Box<dyn Instance>)
                })
            }

            fn no_spares(&self) -> &std::sync::atomic::AtomicBool {
                &self.no_spares
            }
        }

        impl Instance for Live {
            fn call<'a>(
                &'a self,
                store: &'a mut Store<CallState>,
                info: &'a CallInfo,
                export: Export<'a>,
            ) -> Answering<'a> {
                let step = &self.0;
                Box::pin(async move {
                    let ctx = context(info);
                    Ok(match export {
                        Export::Execute { input } => match step.call_execute(&mut *store, &ctx, input).await? {
                            Ok(bindings::StepOutcome::Done(output)) => Answer::Done(output),
                            Ok(bindings::StepOutcome::Wait(w)) => {
                                Answer::Wait { delay_ms: w.delay_ms, signal: w.signal }
                            }
                            Err(e) => e.into(),
                        },
                        Export::Compensate { input, output } => {
                            match step.call_compensate(&mut *store, &ctx, input, output).await? {
                                Ok(output) => Answer::Done(output),
                                Err(e) => e.into(),
                            }
                        }
                    })
                })
            }
        }

        impl From<bindings::StepError> for Answer {
            fn from(e: bindings::StepError) -> Answer {
                match e {
                    bindings::StepError::Retryable(m) => Answer::Retryable(m),
                    bindings::StepError::Rejected(m) => Answer::Rejected(m),
                }
            }
        }

        impl From<Level> for host::Level {
            fn from(level: Level) -> host::Level {
                match level {
                    Level::Trace => host::Level::Trace,
                    Level::Debug => host::Level::Debug,
                    Level::Info => host::Level::Info,
                    Level::Warn => host::Level::Warn,
                    Level::Error => host::Level::Error,
                }
            }
        }
    };
}

mod v0_1;
mod v0_2;

/// The worlds this host serves, oldest first.
pub(super) const WORLDS: &[&dyn PluginWorld] = &[&v0_1::V0_1, &v0_2::V0_2];

/// The package whose interfaces a component imports, before the `/`.
const PACKAGE: &str = "sagahost:plugin";

/// One version of the `sagahost:plugin` world.
pub(super) trait PluginWorld: Sync {
    /// The package version, e.g. `0.1.0`.
    fn version(&self) -> &'static str;
    /// Import prefixes this version grants beyond the policy's common ones.
    fn grants(&self) -> &'static [&'static str] {
        &[]
    }
    /// Defines this version's host imports on the linker.
    fn add_to_linker(&self, linker: &mut Linker<CallState>) -> wasmtime::Result<()>;
    /// Checks the component's exports against this version and keeps it ready to call.
    fn prepare(&self, pre: InstancePre<CallState>) -> wasmtime::Result<Arc<dyn Prepared>>;
}

/// An export's call under way ([`Instance::call`]).
pub(super) type Answering<'a> = Pin<Box<dyn Future<Output = wasmtime::Result<Answer>> + Send + 'a>>;

/// An instantiation under way ([`Prepared::instantiate`]).
pub(super) type Instantiating<'a> = Pin<Box<dyn Future<Output = wasmtime::Result<Box<dyn Instance>>> + Send + 'a>>;

/// A compiled component of some world version, ready to instantiate in a fresh store.
pub(super) trait Prepared: Send + Sync {
    /// Instantiates the component in `store`.
    fn instantiate<'a>(&'a self, store: &'a mut Store<CallState>) -> Instantiating<'a>;

    /// Set when an instantiation of this component ahead of a call reached for the host: it
    /// is then instantiated by its calls only (`spare.rs`).
    fn no_spares(&self) -> &AtomicBool;

    /// Instantiates the component in `store`, marks the store instantiated, and runs one
    /// export.
    fn call<'a>(&'a self, store: &'a mut Store<CallState>, info: &'a CallInfo, export: Export<'a>) -> Answering<'a> {
        Box::pin(async move {
            let instance = self.instantiate(&mut *store).await?;
            store.data_mut().instantiated = Some(std::time::Instant::now());
            instance.call(store, info, export).await
        })
    }
}

/// An instance of a component, in the store it was made in: its exports, run once.
pub(super) trait Instance: Send {
    /// Runs one export.
    fn call<'a>(&'a self, store: &'a mut Store<CallState>, info: &'a CallInfo, export: Export<'a>) -> Answering<'a>;
}

/// Which export a call runs, with its arguments.
#[derive(Debug, Clone, Copy)]
pub(super) enum Export<'a> {
    Execute { input: &'a str },
    Compensate { input: &'a str, output: &'a str },
}

/// What an export answered, in the host's terms, before any check. `compensate` answers
/// only `Done`, `Retryable` or `Rejected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    Done(String),
    Wait { delay_ms: Option<u64>, signal: Option<String> },
    Retryable(String),
    Rejected(String),
}

/// The world a component targets: the version of the `sagahost:plugin` interfaces it
/// imports. A component that imports none of them (it would have to use no contract types at
/// all) is tried against the oldest world.
pub(super) fn classify(engine: &Engine, component: &Component) -> Result<&'static dyn PluginWorld, LoadError> {
    let ty = component.component_type();
    let mut versions: Vec<&str> = ty
        .imports(engine)
        .filter_map(|(name, _)| name.strip_prefix(PACKAGE)?.strip_prefix('/')?.split_once('@').map(|(_, v)| v))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    let served = || WORLDS.iter().map(|w| w.version()).collect::<Vec<_>>().join(", ");
    match versions.as_slice() {
        [] => Ok(WORLDS[0]),
        [version] => WORLDS.iter().copied().find(|w| w.version() == *version).ok_or_else(|| {
            LoadError::WrongWorld(format!(
                "it targets {PACKAGE}@{version}, which this host does not serve; build it against {PACKAGE}@{}",
                served()
            ))
        }),
        several => Err(LoadError::WrongWorld(format!(
            "it imports {PACKAGE} interfaces of several versions ({}); build it against one of {}",
            several.join(", "),
            served()
        ))),
    }
}
