//! `sagahost audit`: the audit trail of admin and operator actions (`GET /admin/audit`),
//! newest first. The table leaves out the states before and after; `-o json` has them.

use http::Method;

use super::client::{query, Auth, Payload};
use super::table::{Cell, Table};
use super::{text, Ctx, Failure, Global};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    /// Only entries about this saga id, plugin digest, plugin, binding (TYPE/STEP) or saga type.
    #[arg(long)]
    pub target: Option<String>,
    /// At most this many entries, 1 to 500 (the host's default: 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: Option<u32>,
}

pub async fn run(args: Args) -> Result<(), Failure> {
    let ctx = Ctx::new(&args.global)?;
    let path =
        format!("/admin/audit{}", query(&[("target", args.target), ("limit", args.limit.map(|l| l.to_string()))]));
    let body = ctx.client.send(Method::GET, &path, Auth::Admin, Payload::None, None).await?.body;
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
    Ok(())
}
