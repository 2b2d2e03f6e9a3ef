//! `sagahost sagas ...`: sagas of any type (the client routes under `/sagas/{type}`), saga
//! definitions (`/admin/sagas`, SPEC §5.3) and the operator actions on stuck sagas
//! (`/admin/sagas/{id}/retry|resolve`, SPEC §5.4).

use std::io::Read as _;
use std::path::PathBuf;

use http::Method;
use serde_json::{json, Value};

use super::client::{encode, Auth, Payload};
use super::orders::{self, KeyArg, ListArgs, SignalArgs};
use super::table::{short_digest, Cell, Table};
use super::{text, Ctx, Failure, Global};
use crate::builtin;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Cmd,
}

/// `--type`: which saga type a command is about.
#[derive(clap::Args, Debug, Clone)]
pub struct TypeArg {
    /// The saga type.
    #[arg(short = 't', long = "type", value_name = "TYPE", default_value = builtin::order::SAGA_TYPE)]
    pub saga_type: String,
}

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// List sagas of a type, newest first (e.g. --status COMPENSATION_FAILED: the stuck ones).
    List {
        #[command(flatten)]
        saga_type: TypeArg,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one saga with its steps.
    Get {
        /// The saga's id.
        id: String,
        #[command(flatten)]
        saga_type: TypeArg,
    },
    /// Cancel a saga: compensates the steps done so far.
    Cancel {
        /// The saga's id.
        id: String,
        #[command(flatten)]
        saga_type: TypeArg,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Send a named signal to the step a saga waits in.
    Signal {
        #[command(flatten)]
        signal: SignalArgs,
        #[command(flatten)]
        saga_type: TypeArg,
    },
    /// Show the definition of a saga type, or of every type: steps, plugins, bindings (admin).
    Definition {
        /// The saga type; every type without one.
        saga_type: Option<String>,
    },
    /// Register or replace a saga type's definition from a JSON file (`-`: standard input).
    /// New sagas use it; running ones keep theirs (admin).
    Define {
        /// The saga type.
        saga_type: String,
        /// The definition: {"steps": [{"name": ..., ...}], "sensitive": [...]} (SPEC §5.3).
        file: PathBuf,
    },
    /// Re-run the compensation of a COMPENSATION_FAILED saga with a fresh budget and the
    /// compensate bindings in force now, after a fix (admin; audited).
    Retry {
        /// The saga's id.
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Mark a COMPENSATION_FAILED saga resolved by hand: it ends CANCELLED (admin; audited).
    Resolve {
        /// The saga's id.
        id: String,
        /// What was done by hand (required), e.g. "refunded in the PSP console".
        #[arg(long)]
        note: String,
        #[command(flatten)]
        key: KeyArg,
    },
}

pub async fn run(args: Args) -> Result<(), Failure> {
    let ctx = Ctx::new(&args.global)?;
    match args.command {
        Cmd::List { saga_type, list } => orders::list(&ctx, &saga_type.saga_type, &list).await,
        Cmd::Get { id, saga_type } => orders::get(&ctx, &saga_type.saga_type, &id).await,
        Cmd::Cancel { id, saga_type, key } => orders::cancel(&ctx, &saga_type.saga_type, &id, &key).await,
        Cmd::Signal { signal, saga_type } => orders::signal(&ctx, &saga_type.saga_type, &signal).await,
        Cmd::Definition { saga_type } => definition(&ctx, saga_type.as_deref()).await,
        Cmd::Define { saga_type, file } => define(&ctx, &saga_type, &file).await,
        Cmd::Retry { id, note, key } => operate(&ctx, &id, "retry", note, &key).await,
        Cmd::Resolve { id, note, key } => operate(&ctx, &id, "resolve", Some(note), &key).await,
    }
}

async fn definition(ctx: &Ctx, saga_type: Option<&str>) -> Result<(), Failure> {
    let path = match saga_type {
        Some(t) => format!("/admin/sagas/{}", encode(t)),
        None => "/admin/sagas".to_owned(),
    };
    let body = ctx.client.send(Method::GET, &path, Auth::Admin, Payload::None, None).await?.body;
    ctx.out.print(&body, |b, colour| match saga_type {
        Some(_) => definitions(std::slice::from_ref(b), colour),
        None => definitions(b["data"].as_array().map_or(&[][..], Vec::as_slice), colour),
    });
    Ok(())
}

/// Reads a JSON document from a file, or from standard input for `-`.
pub(super) fn read_json(file: &std::path::Path) -> Result<Value, Failure> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::usage(format!("cannot read standard input: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|e| Failure::usage(format!("cannot read {}: {e}", file.display())))?
    };
    serde_json::from_str(&text).map_err(|e| Failure::usage(format!("{} is not JSON: {e}", file.display())))
}

async fn define(ctx: &Ctx, saga_type: &str, file: &std::path::Path) -> Result<(), Failure> {
    let spec = read_json(file)?;
    let path = format!("/admin/sagas/{}", encode(saga_type));
    let body = ctx.client.send(Method::PUT, &path, Auth::Admin, Payload::Json(spec), None).await?.body;
    ctx.out.print(&body, |b, colour| definitions(std::slice::from_ref(b), colour));
    Ok(())
}

async fn operate(ctx: &Ctx, id: &str, action: &str, note: Option<String>, key: &KeyArg) -> Result<(), Failure> {
    let path = format!("/admin/sagas/{}/{action}", encode(id));
    let payload = match note {
        Some(note) => Payload::Json(json!({ "note": note })),
        None => Payload::None,
    };
    let body = ctx.client.send(Method::POST, &path, Auth::Admin, payload, key.idempotency_key.as_deref()).await?.body;
    ctx.out.print(&body, |s, colour| orders::summaries(std::slice::from_ref(s), colour));
    Ok(())
}

/// Definitions as one table, a row per step.
pub fn definitions(defs: &[Value], colour: bool) -> String {
    let mut t = Table::new(&["TYPE", "STEP", "STATE", "PLUGIN", "EXECUTE", "COMPENSATE", "TIMEOUT_MS", "RETRIES"]);
    for def in defs {
        for step in def["steps"].as_array().map_or(&[][..], Vec::as_slice) {
            t.row(vec![
                text(def, "type").into(),
                text(step, "name").into(),
                text(step, "state").into(),
                Cell::opt(step["plugin"].as_str()),
                short_digest(text(step, "execute")).into(),
                short_digest(text(step, "compensate")).into(),
                step["timeout_ms"].to_string().into(),
                format!("{}/{}", step["retry"]["max_attempts"], step["compensate_retry"]["max_attempts"]).into(),
            ]);
        }
    }
    t.render(colour)
}
