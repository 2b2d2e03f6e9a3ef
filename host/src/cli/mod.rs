//! The operator CLI (SPEC §9): `sagahost orders|plugins|sagas|audit|dead-letters ...` against a
//! running host, in the same binary as the server.
//!
//! It is a client of the public HTTP API and nothing more, like `sagahost bench`: it reaches a
//! host only over HTTP (SPEC §5) and uses no part of the host's internals but
//! [`crate::builtin`]'s routes (a tidy test checks it). `main.rs` only wires the subcommands.
//!
//! Output: human tables by default ([`table`]; colour only when stdout is a terminal and
//! `NO_COLOR` is unset), or the API's JSON with `-o json`. On failure the API's own error
//! message goes to stderr and the exit code says what kind of failure it was ([`Exit`]), so
//! scripts can branch on it.

pub mod audit;
pub mod client;
pub mod dead_letters;
pub mod orders;
pub mod plugins;
pub mod sagas;
pub mod table;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use http::{Method, StatusCode};
use serde_json::Value;

use self::client::{Auth, Client, Payload};

/// The exit codes, as `--help` lists them (the contract is [`Exit`] and docs/cli.md).
const EXIT_HELP: &str = "\
Exit status: 0 ok, 1 the API refused the request (4xx), 2 usage, 3 host unreachable, 4 not found,
5 auth (401/403), 6 conflict (409), 7 server error (5xx), 8 the URL is not a sagahost.
On failure, stderr has the API's error message. See docs/cli.md.";

/// The client commands, flattened into the binary's own subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Orders (the built-in order saga) of a running host: list, get, cancel, signal.
    #[command(after_help = EXIT_HELP)]
    Orders(orders::Args),
    /// Plugins of a running host (admin): list, upload (and bind), bind, grants, state.
    #[command(after_help = EXIT_HELP)]
    Plugins(plugins::Args),
    /// Sagas of any type and their definitions: list, get, definition, define (admin),
    /// retry and resolve stuck ones (admin).
    #[command(after_help = EXIT_HELP)]
    Sagas(sagas::Args),
    /// The audit trail of admin and operator actions, newest first (admin).
    #[command(after_help = EXIT_HELP)]
    Audit(audit::Args),
    /// Events the sink refused for good: list, redeliver, discard (admin).
    #[command(after_help = EXIT_HELP)]
    DeadLetters(dead_letters::Args),
}

/// Flags every client command takes, before or after its subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Base URL of the host.
    #[arg(long, global = true, env = "SAGAHOST_URL", default_value = "http://127.0.0.1:8080", value_parser = client::parse_url)]
    pub url: String,
    /// Bearer token of the admin routes (plugins, definitions, operator actions, audit).
    #[arg(long, global = true, env = "SAGAHOST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Bearer token of the client routes (orders, sagas), when the host runs with --api-token.
    #[arg(long, global = true, env = "SAGAHOST_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Who acts, recorded in the audit trail of admin changes (the X-Actor header; the host
    /// records `admin` without one).
    #[arg(long, global = true, env = "SAGAHOST_ACTOR")]
    pub actor: Option<String>,
    /// Output format: human tables, or the API's JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// How long to wait for the host's answer, in seconds.
    #[arg(long, global = true, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// Exit codes: the contract scripts rely on (docs/cli.md). 2 is also clap's code for a
/// command line it cannot parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The API refused the request (a 4xx not listed below: invalid input, 413, 422).
    Refused = 1,
    /// Bad flags or arguments, or a local file that cannot be read or parsed.
    Usage = 2,
    /// No answer: nothing listens at the URL, or it did not answer in time.
    Unreachable = 3,
    /// 404: no such order, saga, plugin, type or step.
    NotFound = 4,
    /// 401 or 403: no token, a wrong one, or admin routes are off on the host.
    Auth = 5,
    /// 409: a conflict (a completed order cannot be cancelled, a saga that is not stuck, a
    /// definition changed meanwhile, a request in flight).
    Conflict = 6,
    /// 5xx: the host failed or is unavailable; retrying is safe.
    Server = 7,
    /// The URL answered, but not as sagahost does.
    NotSagahost = 8,
}

impl Exit {
    pub fn of_status(status: StatusCode) -> Exit {
        match status.as_u16() {
            401 | 403 => Exit::Auth,
            404 => Exit::NotFound,
            409 => Exit::Conflict,
            500.. => Exit::Server,
            _ => Exit::Refused,
        }
    }
}

/// Why a command failed: the exit code, the message (the API's own, when it answered), and
/// the HTTP status and error code when there was one.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
    pub http: Option<(u16, String)>,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure { exit, message: message.into(), http: None }
    }

    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(Exit::Usage, message)
    }

    /// One line for stderr: the message, then the status and code it came with.
    pub fn line(&self) -> String {
        let message = crate::text::shown(&self.message);
        match &self.http {
            Some((status, code)) => format!("error: {message} (HTTP {status} {code})"),
            None => format!("error: {message}"),
        }
    }
}

/// What a command prints on success.
pub struct Printer {
    pub output: Output,
    pub colour: bool,
}

impl Printer {
    fn new(output: Output) -> Printer {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Printer { output, colour }
    }

    /// Prints `json` as JSON, or what `human` renders from it as text.
    pub fn print(&self, json: &Value, human: impl FnOnce(&Value, bool) -> String) {
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(json).expect("a JSON value serialises")),
            Output::Table => print!("{}", human(json, self.colour)),
        }
    }
}

/// The entries of a newest-first listing with numeric cursors (`data`, `next_cursor`): the
/// page after `cursor` (`path(cursor)` names it), or with `all` every page from there on; with
/// the cursor of the page after the last one read, if any.
pub async fn pages(
    ctx: &Ctx,
    path: impl Fn(Option<i64>) -> String,
    mut cursor: Option<i64>,
    all: bool,
) -> Result<(Vec<Value>, Option<i64>), Failure> {
    let mut data = Vec::new();
    loop {
        let page = ctx.client.send(Method::GET, &path(cursor), Auth::Admin, Payload::None, None).await?.body;
        data.extend(page["data"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_i64() {
            Some(c) if all => cursor = Some(c),
            next => return Ok((data, next)),
        }
    }
}

/// The context of one command: its client and printer.
pub struct Ctx {
    pub client: Client,
    pub out: Printer,
}

impl Ctx {
    fn new(global: &Global) -> Result<Ctx, Failure> {
        Ok(Ctx { client: Client::new(global)?, out: Printer::new(global.output) })
    }
}

/// Runs a client command; returns the exit code (0, or an [`Exit`]).
pub async fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::Orders(args) => orders::run(args).await,
        Command::Plugins(args) => plugins::run(args).await,
        Command::Sagas(args) => sagas::run(args).await,
        Command::Audit(args) => audit::run(args).await,
        Command::DeadLetters(args) => dead_letters::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let line = failure.line();
            if std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) {
                eprintln!("\x1b[31m{line}\x1b[0m");
            } else {
                eprintln!("{line}");
            }
            ExitCode::from(failure.exit as u8)
        }
    }
}

/// A string field of a JSON answer, or `""`.
pub(crate) fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_print_the_apis_message_with_status_and_code_on_one_line() {
        let f = Failure {
            exit: Exit::NotFound,
            message: "no order with id 'x'; check the id\nsecond".into(),
            http: Some((404, "not_found".into())),
        };
        assert_eq!(f.line(), "error: no order with id 'x'; check the id second (HTTP 404 not_found)");
        assert_eq!(Failure::usage("bad").line(), "error: bad");
    }

    #[test]
    fn exit_codes_are_the_documented_numbers() {
        let codes = [
            (Exit::Refused, 1),
            (Exit::Usage, 2),
            (Exit::Unreachable, 3),
            (Exit::NotFound, 4),
            (Exit::Auth, 5),
            (Exit::Conflict, 6),
            (Exit::Server, 7),
            (Exit::NotSagahost, 8),
        ];
        for (exit, code) in codes {
            assert_eq!(exit as u8, code, "{exit:?}");
        }
    }
}
