//! `sagahost orders list|get|cancel|signal`: the client routes of sagas (SPEC §5.2), for the
//! built-in order saga here and for any saga type through `sagahost sagas` (which calls the
//! same functions with its `--type`). Also renders a saga and a page of sagas as tables.

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::client::{encode, query, Auth, Payload};
use super::table::{pairs, short_digest, Cell, Table};
use super::{text, Ctx, Failure, Global};
use crate::builtin;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// List orders, newest first.
    List(ListArgs),
    /// Show one order with its steps: status, attempts, plugin digests, errors.
    Get {
        /// The order's id.
        id: String,
    },
    /// Cancel an order: compensates the steps done so far. A completed order cannot be
    /// cancelled (exit 6); cancelling one already cancelled succeeds.
    Cancel {
        /// The order's id.
        id: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Send a named signal to the step an order waits in (e.g. payment-confirmed).
    Signal(SignalArgs),
}

/// Filters and paging of a list.
#[derive(clap::Args, Debug, Clone)]
pub struct ListArgs {
    /// Only sagas with this status, e.g. CANCELLED or COMPENSATION_FAILED.
    #[arg(long)]
    pub status: Option<String>,
    /// Page size, 1 to 100 (the host's default: 20).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub limit: Option<u32>,
    /// Start after this cursor (the next_cursor of the page before).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow next_cursor to the last page.
    #[arg(long, conflicts_with = "cursor")]
    pub all: bool,
}

/// `--idempotency-key`, for the mutating commands that honour one.
#[derive(clap::Args, Debug, Clone)]
pub struct KeyArg {
    /// Idempotency-Key of the request: send the command again with the same key and the host
    /// answers as it did the first time instead of acting twice.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SignalArgs {
    /// The saga's id.
    pub id: String,
    /// The signal's name, as the step's waiting_for shows it.
    pub name: String,
    /// The signal's payload: any JSON value, which the waiting step receives.
    #[arg(long, default_value = "{}")]
    pub data: String,
    #[command(flatten)]
    pub key: KeyArg,
}

pub async fn run(args: Args) -> Result<(), Failure> {
    let ctx = Ctx::new(&args.global)?;
    let saga_type = builtin::order::SAGA_TYPE;
    match args.command {
        Cmd::List(list_args) => list(&ctx, saga_type, &list_args).await,
        Cmd::Get { id } => get(&ctx, saga_type, &id).await,
        Cmd::Cancel { id, key } => cancel(&ctx, saga_type, &id, &key).await,
        Cmd::Signal(signal_args) => signal(&ctx, saga_type, &signal_args).await,
    }
}

/// The route of a saga type's collection (`/orders`, `/sagas/{type}`).
fn collection(saga_type: &str) -> String {
    builtin::collection(&encode(saga_type))
}

fn location(saga_type: &str, id: &str) -> String {
    builtin::location(&encode(saga_type), &encode(id))
}

pub async fn list(ctx: &Ctx, saga_type: &str, args: &ListArgs) -> Result<(), Failure> {
    let mut cursor = args.cursor.clone();
    let mut data = Vec::new();
    let next = loop {
        let path = format!(
            "{}{}",
            collection(saga_type),
            query(&[
                ("status", args.status.clone()),
                ("limit", args.limit.map(|l| l.to_string())),
                ("cursor", cursor.clone()),
            ])
        );
        let page = ctx.client.send(Method::GET, &path, Auth::Client, Payload::None, None).await?.body;
        data.extend(page["data"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) if args.all => cursor = Some(c.to_owned()),
            next => break next.map(str::to_owned),
        }
    };
    let page = json!({ "data": data, "next_cursor": next });
    ctx.out.print(&page, |p, colour| summaries(p["data"].as_array().map_or(&[][..], Vec::as_slice), colour));
    if let (super::Output::Table, Some(c)) = (ctx.out.output, &next) {
        eprintln!("(more: --cursor {c}, or --all)");
    }
    Ok(())
}

pub async fn get(ctx: &Ctx, saga_type: &str, id: &str) -> Result<(), Failure> {
    let saga = ctx.client.send(Method::GET, &location(saga_type, id), Auth::Client, Payload::None, None).await?.body;
    ctx.out.print(&saga, detail);
    Ok(())
}

pub async fn cancel(ctx: &Ctx, saga_type: &str, id: &str, key: &KeyArg) -> Result<(), Failure> {
    let path = format!("{}/cancel", location(saga_type, id));
    let answer =
        ctx.client.send(Method::POST, &path, Auth::Client, Payload::None, key.idempotency_key.as_deref()).await?;
    let already = answer.status == StatusCode::OK;
    ctx.out.print(&answer.body, |s, colour| {
        let mut out = summaries(std::slice::from_ref(s), colour);
        if already {
            out.push_str("(it was already cancelling or cancelled)\n");
        }
        out
    });
    Ok(())
}

pub async fn signal(ctx: &Ctx, saga_type: &str, args: &SignalArgs) -> Result<(), Failure> {
    let data: Value = serde_json::from_str(&args.data)
        .map_err(|e| Failure::usage(format!("--data is not JSON ({e}); e.g. --data '{{\"auth\": \"ok\"}}'")))?;
    let path = format!("{}/signals/{}", location(saga_type, &args.id), encode(&args.name));
    let answer = ctx
        .client
        .send(Method::POST, &path, Auth::Client, Payload::Json(data), args.key.idempotency_key.as_deref())
        .await?;
    ctx.out.print(&answer.body, |s, colour| summaries(std::slice::from_ref(s), colour));
    Ok(())
}

/// A page of sagas (or one saga's headline) as a table.
pub fn summaries(sagas: &[Value], colour: bool) -> String {
    let mut t = Table::new(&["ID", "STATUS", "CREATED", "UPDATED", "REASON"]);
    for s in sagas {
        t.row(vec![
            text(s, "id").into(),
            Cell::status(text(s, "status")),
            text(s, "created_at").into(),
            text(s, "updated_at").into(),
            Cell::opt(s["reason"].as_str()),
        ]);
    }
    t.render(colour)
}

/// One saga: its fields, then a table of its steps.
pub fn detail(s: &Value, colour: bool) -> String {
    let mut out = pairs(
        &[
            ("id", text(s, "id").into()),
            ("type", text(s, "saga_type").into()),
            ("status", Cell::status(text(s, "status"))),
            ("reason", Cell::opt(s["reason"].as_str())),
            ("created", text(s, "created_at").into()),
            ("updated", text(s, "updated_at").into()),
        ],
        colour,
    );
    out.push('\n');
    let mut t = Table::new(&["STEP", "STATUS", "ATTEMPTS", "COMPENSATIONS", "EXECUTE", "COMPENSATE", "NOTE"]);
    for step in s["steps"].as_array().map_or(&[][..], Vec::as_slice) {
        let note = match (step["waiting_for"].as_str(), step["last_error"].as_str()) {
            (Some(signal), _) => Cell::new(format!("waiting for signal {signal}"), super::table::Style::Warn),
            (None, error) => Cell::opt(error),
        };
        t.row(vec![
            text(step, "name").into(),
            Cell::status(text(step, "status")),
            step["attempts"].to_string().into(),
            step["compensate_attempts"].to_string().into(),
            short_digest(text(step, "execute_digest")).into(),
            step["compensate_digest"].as_str().map_or_else(Cell::none, |d| short_digest(d).into()),
            note,
        ]);
    }
    out.push_str(&t.render(colour));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saga_renders_as_fields_and_a_step_table() {
        let digest = format!("sha256:{}", "0123456789ab".repeat(5) + "cdef");
        let saga = json!({
            "id": "5f0c", "saga_type": "t", "status": "COMPENSATION_FAILED", "reason": "shipment: no carrier for XX",
            "created_at": "2026-12-01T10:00:00.000Z", "updated_at": "2026-12-01T10:00:01.000Z",
            "steps": [
                {"name": "inventory", "status": "compensated", "attempts": 1, "compensate_attempts": 1,
                 "execute_digest": digest, "compensate_digest": digest, "last_error": null, "waiting_for": null},
                {"name": "payment", "status": "compensation_failed", "attempts": 1, "compensate_attempts": 20,
                 "execute_digest": digest, "compensate_digest": null, "last_error": "refund: panicked", "waiting_for": null},
                {"name": "signal", "status": "waiting", "attempts": 1, "compensate_attempts": 0,
                 "execute_digest": digest, "compensate_digest": null, "last_error": null, "waiting_for": "go"},
            ]
        });
        let out = detail(&saga, false);
        assert_eq!(
            out,
            "id:      5f0c\n\
             type:    t\n\
             status:  COMPENSATION_FAILED\n\
             reason:  shipment: no carrier for XX\n\
             created: 2026-12-01T10:00:00.000Z\n\
             updated: 2026-12-01T10:00:01.000Z\n\
             \n\
             STEP       STATUS               ATTEMPTS  COMPENSATIONS  EXECUTE              COMPENSATE           NOTE\n\
             inventory  compensated          1         1              sha256:0123456789ab  sha256:0123456789ab  -\n\
             payment    compensation_failed  1         20             sha256:0123456789ab  -                    refund: panicked\n\
             signal     waiting              1         0              sha256:0123456789ab  -                    waiting for signal go\n"
        );
    }

    #[test]
    fn list_flags_parse_and_all_excludes_a_cursor() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            list: ListArgs,
        }
        let t = T::try_parse_from(["t", "--status", "CANCELLED", "--limit", "5", "--all"]).unwrap();
        assert_eq!((t.list.status.as_deref(), t.list.limit, t.list.all), (Some("CANCELLED"), Some(5), true));
        assert!(T::try_parse_from(["t", "--limit", "0"]).is_err());
        assert!(T::try_parse_from(["t", "--limit", "101"]).is_err());
        assert!(T::try_parse_from(["t", "--all", "--cursor", "x"]).is_err());
    }
}
