//! `sagahost dead-letters ...`: events the sink refused for good (`/admin/dead-letters`):
//! list them, send one again once the sink takes it, or discard one (both audited).

use http::Method;

use super::client::{encode, query, Auth, Payload};
use super::orders::KeyArg;
use super::table::{Cell, Table};
use super::{text, Ctx, Failure, Global};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// List dead letters, newest first: saga, seq, event type and why the sink refused it.
    List {
        /// At most this many per page, 1 to 500 (the host's default: 100).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: Option<u32>,
        /// Start after this cursor (the next_cursor of the page before): older ones.
        #[arg(long)]
        cursor: Option<i64>,
        /// Follow next_cursor to the oldest one.
        #[arg(long, conflicts_with = "cursor")]
        all: bool,
    },
    /// Send an event again, once the sink takes it (the broker's size limit raised, say): it
    /// goes back in the outbox as it was and fills its saga's gap out of order (audited).
    Redeliver {
        /// The event's id (EVENT_ID of the list).
        event_id: String,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Delete a dead letter for good, when consumers will never need the event (audited).
    Discard {
        /// The event's id (EVENT_ID of the list).
        event_id: String,
        #[command(flatten)]
        key: KeyArg,
    },
}

pub async fn run(args: Args) -> Result<(), Failure> {
    let ctx = Ctx::new(&args.global)?;
    match args.command {
        Cmd::List { limit, cursor, all } => list(&ctx, limit, cursor, all).await,
        Cmd::Redeliver { event_id, key } => {
            let path = format!("/admin/dead-letters/{}/redeliver", encode(&event_id));
            let key = key.idempotency_key.as_deref();
            let body = ctx.client.send(Method::POST, &path, Auth::Admin, Payload::None, key).await?.body;
            ctx.out.print(&body, |_, _| format!("event {event_id} is back in the outbox; the relay sends it next\n"));
            Ok(())
        }
        Cmd::Discard { event_id, key } => {
            let path = format!("/admin/dead-letters/{}", encode(&event_id));
            let key = key.idempotency_key.as_deref();
            ctx.client.send(Method::DELETE, &path, Auth::Admin, Payload::None, key).await?;
            let body = serde_json::json!({ "event_id": event_id, "discarded": true });
            ctx.out.print(&body, |_, _| format!("dead letter of event {event_id} discarded\n"));
            Ok(())
        }
    }
}

async fn list(ctx: &Ctx, limit: Option<u32>, cursor: Option<i64>, all: bool) -> Result<(), Failure> {
    let path = |cursor: Option<i64>| {
        format!(
            "/admin/dead-letters{}",
            query(&[("limit", limit.map(|l| l.to_string())), ("cursor", cursor.map(|c| c.to_string()))])
        )
    };
    let (data, next) = super::pages(ctx, path, cursor, all).await?;
    // The events themselves are left out of the table (`-o json` has them).
    let body = serde_json::json!({ "data": data, "next_cursor": next });
    ctx.out.print(&body, |b, colour| {
        let mut t = Table::new(&["AT", "EVENT_ID", "SAGA_ID", "SEQ", "TYPE", "SIZE", "REASON"]);
        for d in b["data"].as_array().map_or(&[][..], Vec::as_slice) {
            t.row(vec![
                text(d, "at").into(),
                text(d, "event_id").into(),
                text(d, "saga_id").into(),
                d["seq"].to_string().into(),
                text(d, "event_type").into(),
                d["size"].to_string().into(),
                Cell::opt(d["reason"].as_str()),
            ]);
        }
        t.render(colour)
    });
    if let (super::Output::Table, Some(c)) = (ctx.out.output, next) {
        eprintln!("(more: --cursor {c}, or --all)");
    }
    Ok(())
}
