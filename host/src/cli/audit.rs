//! `sagahost audit`: the audit trail of admin and operator actions (`GET /admin/audit`),
//! newest first. The table leaves out the states before and after; `-o json` has them.

use super::client::query;
use super::table::{Cell, Table};
use super::{text, Ctx, Failure, Global};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    /// Only entries about this saga id, plugin digest, plugin, binding (TYPE/STEP), saga type or
    /// event id (a dead letter's).
    #[arg(long)]
    pub target: Option<String>,
    /// At most this many entries per page, 1 to 500 (the host's default: 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: Option<u32>,
    /// Start after this cursor (the next_cursor of the page before): older entries.
    #[arg(long)]
    pub cursor: Option<i64>,
    /// Follow next_cursor to the oldest entry.
    #[arg(long, conflicts_with = "cursor")]
    pub all: bool,
}

pub async fn run(args: Args) -> Result<(), Failure> {
    let ctx = Ctx::new(&args.global)?;
    let path = |cursor: Option<i64>| {
        format!(
            "/admin/audit{}",
            query(&[
                ("target", args.target.clone()),
                ("limit", args.limit.map(|l| l.to_string())),
                ("cursor", cursor.map(|c| c.to_string())),
            ])
        )
    };
    let (data, next) = super::pages(&ctx, path, args.cursor, args.all).await?;
    let body = serde_json::json!({ "data": data, "next_cursor": next });
    ctx.out.print(&body, |b, colour| {
        let mut t = Table::new(&["AT", "ACTOR", "ACTION", "TARGET", "NOTE"]);
        for e in b["data"].as_array().map_or(&[][..], Vec::as_slice) {
            t.row(vec![
                text(e, "at").into(),
                text(e, "actor").into(),
                text(e, "action").into(),
                text(e, "target").into(),
                Cell::opt(e["note"].as_str()),
            ]);
        }
        t.render(colour)
    });
    if let (super::Output::Table, Some(c)) = (ctx.out.output, next) {
        eprintln!("(more: --cursor {c}, or --all)");
    }
    Ok(())
}
