//! `sagahost plugins list|upload|bind|grants|state`: the admin routes of plugins, bindings and
//! grants (SPEC §5.3, §4.1). `upload --bind TYPE/STEP` is the hot-swap flow in one command:
//! upload a version, then bind it to a step (`--compensate-only`: fix the compensations of
//! sagas in flight or stuck without changing what new sagas execute).

use std::path::PathBuf;

use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::client::{encode, query, Auth, Payload};
use super::table::{pairs, Cell, Table};
use super::{text, Ctx, Failure, Global};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Cmd,
}

/// A step of a saga type, written `TYPE/STEP` (e.g. order/payment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRef {
    pub saga_type: String,
    pub step: String,
}

impl StepRef {
    pub fn parse(s: &str) -> Result<StepRef, String> {
        match s.split_once('/') {
            Some((t, step)) if !t.is_empty() && !step.is_empty() && !step.contains('/') => {
                Ok(StepRef { saga_type: t.to_owned(), step: step.to_owned() })
            }
            _ => Err(format!("expected TYPE/STEP, e.g. order/payment; got '{s}'")),
        }
    }

    fn path(&self) -> String {
        format!("/admin/sagas/{}/steps/{}", encode(&self.saga_type), encode(&self.step))
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// List plugins and their versions (oldest first): digest, size, upload time, WIT version.
    List {
        /// Only this plugin (exit 4 if it was never uploaded).
        name: Option<String>,
    },
    /// Upload a component (.wasm) as a version of a plugin; with --bind, bind it to a step.
    #[command(after_help = "Example, the hot swap of a payment refund for sagas in flight and stuck ones:\n  \
        sagahost plugins upload payment_fixed.wasm --name payment --bind order/payment --compensate-only")]
    Upload {
        /// The component file.
        file: PathBuf,
        /// The plugin's name; a step stays bound to versions of one plugin.
        #[arg(long)]
        name: String,
        /// Then bind the uploaded version to this step (execute and compensate, unless
        /// --compensate-only or --execute-only).
        #[arg(long, value_name = "TYPE/STEP", value_parser = StepRef::parse)]
        bind: Option<StepRef>,
        /// Bind only the step's compensation: every compensation from now on uses it, new
        /// sagas still execute the version bound before.
        #[arg(long, requires = "bind", conflicts_with = "execute_only")]
        compensate_only: bool,
        /// Bind only the step's execute: new sagas use it, compensations keep their binding.
        #[arg(long, requires = "bind")]
        execute_only: bool,
    },
    /// Bind uploaded versions (by digest) to a step. New sagas execute the execute binding;
    /// every compensation from now on uses the compensate binding. Audited, reversible.
    Bind {
        /// The step, as TYPE/STEP (e.g. order/payment).
        #[arg(value_parser = StepRef::parse)]
        step: StepRef,
        /// Digest (sha256:...) of the version to execute.
        #[arg(long, value_name = "DIGEST", required_unless_present = "compensate")]
        execute: Option<String>,
        /// Digest (sha256:...) of the version to compensate with.
        #[arg(long, value_name = "DIGEST")]
        compensate: Option<String>,
    },
    /// Show the origins a plugin may reach over outbound HTTP and the credentials the host adds
    /// there; with --allow or --revoke-all, replace them (audited).
    Grants {
        /// The plugin.
        name: String,
        /// An origin to grant (http[s]://host[:port]); repeat for several. Replaces the list.
        #[arg(long = "allow", value_name = "ORIGIN")]
        allow: Vec<String>,
        /// A header the host sets on the plugin's requests to a granted origin, as
        /// 'ORIGIN HEADER: VALUE' with ${name} for the host's secret `name` (a file of its
        /// --outbound-secrets-dir), e.g. 'https://api.stripe.com Authorization: Bearer
        /// ${stripe-key}', in single quotes; repeat for several. Replaces the credentials:
        /// give them with every --allow change that should keep them.
        #[arg(long = "credential", value_name = "'ORIGIN HEADER: VALUE'", requires = "allow", value_parser = crate::grants::parse_credential_flag)]
        credential: Vec<crate::grants::Credential>,
        /// Revoke every grant.
        #[arg(long, conflicts_with = "allow")]
        revoke_all: bool,
    },
    /// Read-only view of a plugin's state, by key.
    State {
        /// The plugin.
        name: String,
        /// Only keys starting with this prefix, e.g. charge/.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many entries per page, 1 to 1000 (the host's default: 100).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
        /// Start after this cursor (the next_cursor of the page before).
        #[arg(long)]
        cursor: Option<String>,
        /// Follow next_cursor to the last entry.
        #[arg(long, conflicts_with = "cursor")]
        all: bool,
    },
}

pub async fn run(args: Args) -> Result<(), Failure> {
    let ctx = Ctx::new(&args.global)?;
    match args.command {
        Cmd::List { name } => list(&ctx, name.as_deref()).await,
        Cmd::Upload { file, name, bind, compensate_only, execute_only } => {
            upload(&ctx, &file, &name, bind.as_ref(), !compensate_only, !execute_only).await
        }
        Cmd::Bind { step, execute, compensate } => {
            let body = binding(&ctx, &step, execute.as_deref(), compensate.as_deref()).await?;
            ctx.out.print(&body, bound);
            Ok(())
        }
        Cmd::Grants { name, allow, credential, revoke_all } => grants(&ctx, &name, allow, credential, revoke_all).await,
        Cmd::State { name, prefix, limit, cursor, all } => state(&ctx, &name, prefix, limit, cursor, all).await,
    }
}

async fn list(ctx: &Ctx, name: Option<&str>) -> Result<(), Failure> {
    let path = match name {
        Some(n) => format!("/admin/plugins/{}", encode(n)),
        None => "/admin/plugins".to_owned(),
    };
    let body = ctx.client.send(Method::GET, &path, Auth::Admin, Payload::None, None).await?.body;
    ctx.out.print(&body, |b, colour| match name {
        Some(_) => versions(std::slice::from_ref(b), colour),
        None => versions(b["data"].as_array().map_or(&[][..], Vec::as_slice), colour),
    });
    Ok(())
}

/// Plugins as one table, a row per version.
fn versions(plugins: &[Value], colour: bool) -> String {
    let mut t = Table::new(&["NAME", "DIGEST", "SIZE", "UPLOADED", "WIT", "HTTP"]);
    for p in plugins {
        for v in p["versions"].as_array().map_or(&[][..], Vec::as_slice) {
            t.row(vec![
                text(p, "name").into(),
                text(v, "digest").into(),
                v["size"].to_string().into(),
                text(v, "uploaded_at").into(),
                Cell::opt(v["world"].as_str()),
                match v["outbound_http"].as_bool() {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => Cell::none(),
                },
            ]);
        }
    }
    t.render(colour)
}

async fn upload(
    ctx: &Ctx,
    file: &std::path::Path,
    name: &str,
    bind: Option<&StepRef>,
    execute: bool,
    compensate: bool,
) -> Result<(), Failure> {
    let bytes = std::fs::read(file).map_err(|e| Failure::usage(format!("cannot read {}: {e}", file.display())))?;
    let path = format!("/admin/plugins/{}", encode(name));
    let answer = ctx.client.send(Method::POST, &path, Auth::Admin, Payload::Wasm(bytes), None).await?;
    let new = answer.status == StatusCode::CREATED;
    let uploaded = answer.body;
    let Some(step) = bind else {
        ctx.out.print(&uploaded, |u, colour| upload_pairs(u, new, colour));
        return Ok(());
    };
    let digest = text(&uploaded, "digest").to_owned();
    let binding = binding(ctx, step, execute.then_some(digest.as_str()), compensate.then_some(digest.as_str()))
        .await
        .map_err(|mut f| {
        f.message = format!("uploaded {name} as {digest}, but binding it failed: {}", f.message);
        f
    })?;
    let both = json!({ "upload": uploaded, "binding": binding });
    ctx.out.print(&both, |b, colour| {
        let mut out = upload_pairs(&b["upload"], new, colour);
        out.push('\n');
        out.push_str(&bound(&b["binding"], colour));
        out
    });
    Ok(())
}

fn upload_pairs(u: &Value, new: bool, colour: bool) -> String {
    pairs(
        &[
            ("plugin", text(u, "name").into()),
            ("digest", text(u, "digest").into()),
            ("size", u["size"].to_string().into()),
            ("uploaded", if new { "yes".into() } else { "no: these bytes were uploaded before".into() }),
        ],
        colour,
    )
}

async fn binding(ctx: &Ctx, step: &StepRef, execute: Option<&str>, compensate: Option<&str>) -> Result<Value, Failure> {
    let mut req = Map::new();
    if let Some(d) = execute {
        req.insert("execute".into(), d.into());
    }
    if let Some(d) = compensate {
        req.insert("compensate".into(), d.into());
    }
    Ok(ctx.client.send(Method::PUT, &step.path(), Auth::Admin, Payload::Json(Value::Object(req)), None).await?.body)
}

fn bound(b: &Value, colour: bool) -> String {
    pairs(
        &[
            ("step", format!("{}/{}", text(b, "saga_type"), text(b, "step")).into()),
            ("execute", text(b, "execute").into()),
            ("compensate", text(b, "compensate").into()),
        ],
        colour,
    )
}

async fn grants(
    ctx: &Ctx,
    name: &str,
    allow: Vec<String>,
    credentials: Vec<crate::grants::Credential>,
    revoke_all: bool,
) -> Result<(), Failure> {
    let path = format!("/admin/plugins/{}/grants", encode(name));
    let body = if allow.is_empty() && !revoke_all {
        ctx.client.send(Method::GET, &path, Auth::Admin, Payload::None, None).await?.body
    } else {
        let req = json!({ "allowed_hosts": allow, "credentials": credentials });
        ctx.client.send(Method::PUT, &path, Auth::Admin, Payload::Json(req), None).await?.body
    };
    ctx.out.print(&body, |g, colour| {
        let list = |field: &str, line: &dyn Fn(&Value) -> String| -> Cell {
            let items: Vec<String> = g[field].as_array().map_or(&[][..], Vec::as_slice).iter().map(line).collect();
            if items.is_empty() {
                Cell::new("none", super::table::Style::Dim)
            } else {
                items.join(", ").into()
            }
        };
        let hosts = list("allowed_hosts", &|h| h.as_str().unwrap_or_default().to_owned());
        let credentials =
            list("credentials", &|c| format!("{} {}: {}", text(c, "origin"), text(c, "header"), text(c, "value")));
        pairs(&[("plugin", text(g, "plugin").into()), ("allowed hosts", hosts), ("credentials", credentials)], colour)
    });
    Ok(())
}

async fn state(
    ctx: &Ctx,
    name: &str,
    prefix: Option<String>,
    limit: Option<u32>,
    mut cursor: Option<String>,
    all: bool,
) -> Result<(), Failure> {
    let mut data = Vec::new();
    let next = loop {
        let path = format!(
            "/admin/plugins/{}/state{}",
            encode(name),
            query(&[("prefix", prefix.clone()), ("limit", limit.map(|l| l.to_string())), ("cursor", cursor.clone())])
        );
        let page = ctx.client.send(Method::GET, &path, Auth::Admin, Payload::None, None).await?.body;
        data.extend(page["data"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) if all => cursor = Some(c.to_owned()),
            next => break next.map(str::to_owned),
        }
    };
    let body = serde_json::json!({ "data": data, "next_cursor": next });
    ctx.out.print(&body, |b, colour| {
        let mut t = Table::new(&["KEY", "VALUE"]);
        for e in b["data"].as_array().map_or(&[][..], Vec::as_slice) {
            t.row(vec![text(e, "key").into(), e["value"].to_string().into()]);
        }
        t.render(colour)
    });
    if let (super::Output::Table, Some(c)) = (ctx.out.output, next) {
        eprintln!("(more: --cursor {}, or --all)", crate::text::shown(&c));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_written_type_slash_step() {
        assert_eq!(
            StepRef::parse("checkout/payment").unwrap(),
            StepRef { saga_type: "checkout".into(), step: "payment".into() }
        );
        for bad in ["checkout", "checkout/", "/payment", "a/b/c", ""] {
            assert!(StepRef::parse(bad).is_err(), "{bad}");
        }
        let weird = StepRef { saga_type: "a b".into(), step: "c?d".into() };
        assert_eq!(weird.path(), "/admin/sagas/a%20b/steps/c%3Fd");
    }
}
