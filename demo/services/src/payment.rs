//! The payment service: one charge record per order, effects `charge` and `refund`, and the
//! 3-D Secure confirmation that signals sagahost through the webhook.
//!
//! Tokens: `tok_decline` is declined (402, stored), `tok_flaky` fails the first two requests of
//! a key with 503, `tok_3ds` needs a confirmation (202 `requires_action`), `tok_hold` commits
//! the charge and then holds the answer for `--hold-ms` (for crash tests). Every other token
//! charges.

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use sqlx::SqliteConnection;

use crate::effects;
use crate::error::{non_empty, parse_json, ApiError};
use crate::idempotency::{Answer, Keyed};
use crate::server::{Admission, Core, Triggers};
use crate::webhook::{self, Webhook};

/// The service name, also the database file name.
pub const NAME: &str = "payment";
/// The effects this service counts.
pub const EFFECTS: &[&str] = &["charge", "refund"];

/// The domain tables: one charge per order (a new key charges again and counts again) and the
/// webhook outbox.
pub fn schema() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS charges (
            order_id     TEXT PRIMARY KEY,
            amount_cents INTEGER NOT NULL,
            currency     TEXT NOT NULL,
            status       TEXT NOT NULL, -- requires_action | charged | refunded | cancelled
            updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        );
        {}",
        webhook::SCHEMA
    )
}

#[derive(Debug, Deserialize)]
struct ChargeRequest {
    order_id: String,
    amount_cents: u64,
    currency: String,
    token: String,
}

#[derive(Debug, Deserialize)]
struct RefundRequest {
    order_id: String,
}

#[derive(Clone)]
struct Payment {
    core: Core,
    webhook: Webhook,
    hold: Duration,
}

/// The service's routes, with `core` as their state. With `api_key_file`, charges and
/// refunds need its key as a bearer token; the 3-D Secure confirmation (the customer's bank)
/// does not.
pub fn routes(core: Core, webhook: Webhook, hold: Duration, api_key_file: Option<PathBuf>) -> Router {
    let mut keyed = Router::new()
        .route("/charges", post(charge))
        .route("/charges/{order_id}", get(show))
        .route("/refunds", post(refund));
    if let Some(file) = api_key_file {
        keyed = keyed.route_layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            let file = file.clone();
            async move { require_key(&file, req, next).await }
        }));
    }
    Router::new().merge(keyed).route("/charges/{order_id}/confirm", post(confirm)).with_state(Payment {
        core,
        webhook,
        hold,
    })
}

/// Lets `req` through only with `Authorization: Bearer <the key in file>`, the file read now
/// (so replacing it rotates the key; a trailing line break is not part of the key).
async fn require_key(file: &std::path::Path, req: Request, next: Next) -> Result<Response, ApiError> {
    let key = tokio::fs::read_to_string(file)
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("cannot read the API key file {}: {e}", file.display())))?;
    let expected = format!("Bearer {}", key.trim_end_matches(['\r', '\n']));
    match req.headers().get(axum::http::header::AUTHORIZATION) {
        Some(sent) if sent.as_bytes() == expected.as_bytes() => Ok(next.run(req).await),
        Some(_) => Err(ApiError::Unauthorized("invalid API key".to_owned())),
        None => Err(ApiError::Unauthorized("no API key: send Authorization: Bearer <key>".to_owned())),
    }
}

/// A charge record as the API shows it.
struct Charge {
    order_id: String,
    amount_cents: i64,
    currency: String,
    status: String,
}

impl Charge {
    fn view(&self) -> serde_json::Value {
        json!({
            "charge_id": format!("ch_{}", self.order_id),
            "order_id": self.order_id,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "status": self.status,
        })
    }

    async fn load(conn: &mut SqliteConnection, order_id: &str) -> Result<Option<Charge>, sqlx::Error> {
        let row: Option<(i64, String, String)> =
            sqlx::query_as("SELECT amount_cents, currency, status FROM charges WHERE order_id = ?")
                .bind(order_id)
                .fetch_optional(conn)
                .await?;
        Ok(row.map(|(amount_cents, currency, status)| Charge {
            order_id: order_id.to_owned(),
            amount_cents,
            currency,
            status,
        }))
    }

    async fn save(&self, conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO charges (order_id, amount_cents, currency, status) VALUES (?, ?, ?, ?)
             ON CONFLICT (order_id) DO UPDATE SET amount_cents = excluded.amount_cents,
                 currency = excluded.currency, status = excluded.status, updated_at = excluded.updated_at",
        )
        .bind(&self.order_id)
        .bind(self.amount_cents)
        .bind(&self.currency)
        .bind(&self.status)
        .execute(conn)
        .await?;
        Ok(())
    }
}

async fn charge(State(svc): State<Payment>, req: Keyed) -> Result<Answer, ApiError> {
    let body: ChargeRequest = parse_json(&req.body)?;
    non_empty("order_id", &body.order_id)?;
    non_empty("currency", &body.currency)?;
    let amount_cents = i64::try_from(body.amount_cents)
        .map_err(|_| ApiError::BadRequest("field `amount_cents` is too large".to_owned()))?;
    let triggers = Triggers { flaky: (body.token == "tok_flaky").then_some("payment gateway unavailable"), slow: None };
    let mut pending = match svc.core.admit(&req, triggers).await? {
        Admission::Replay(answer) => return Ok(answer),
        Admission::New(pending) => pending,
    };
    if body.token == "tok_decline" {
        return pending
            .finish(&req, Answer::json(StatusCode::PAYMENT_REQUIRED, &json!({ "error": "card declined" })))
            .await;
    }
    let needs_action = body.token == "tok_3ds";
    let record = Charge {
        order_id: body.order_id,
        amount_cents,
        currency: body.currency,
        status: if needs_action { "requires_action" } else { "charged" }.to_owned(),
    };
    record.save(&mut pending.tx).await?;
    let status = if needs_action {
        StatusCode::ACCEPTED
    } else {
        effects::bump(&mut pending.tx, &record.order_id, "charge").await?;
        StatusCode::CREATED
    };
    let answer = pending.finish(&req, Answer::json(status, &record.view())).await?;
    if body.token == "tok_hold" {
        // The charge and its answer are committed: a client that gives up (or dies) now and
        // retries with the same key gets the replay. Answering early on shutdown is fine.
        let _ = svc.core.pause(svc.hold).await;
    }
    Ok(answer)
}

async fn show(State(svc): State<Payment>, Path(order_id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let mut conn = svc.core.db.acquire().await?;
    match Charge::load(&mut conn, &order_id).await? {
        Some(record) => Ok(Json(record.view())),
        None => Err(ApiError::NotFound(format!("no charge for order {order_id}"))),
    }
}

/// The customer finished 3-D Secure. Keyless: the record's state makes it idempotent.
async fn confirm(
    State(svc): State<Payment>,
    Path(order_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut pending = svc.core.write().await?;
    let Some(mut record) = Charge::load(&mut pending.tx, &order_id).await? else {
        return Err(ApiError::NotFound(format!("no charge for order {order_id}")));
    };
    match record.status.as_str() {
        "charged" => Ok(Json(record.view())),
        "requires_action" => {
            record.status = "charged".to_owned();
            record.save(&mut pending.tx).await?;
            effects::bump(&mut pending.tx, &order_id, "charge").await?;
            let charge_id = format!("ch_{order_id}");
            let id = Webhook::enqueue(&mut pending.tx, &order_id, &charge_id).await?;
            pending.release().await?;
            svc.webhook.spawn(id);
            Ok(Json(record.view()))
        }
        other => Err(ApiError::Conflict(format!("the charge is {other}; it cannot be confirmed any more"))),
    }
}

async fn refund(State(svc): State<Payment>, req: Keyed) -> Result<Answer, ApiError> {
    let body: RefundRequest = parse_json(&req.body)?;
    non_empty("order_id", &body.order_id)?;
    let mut pending = match svc.core.admit(&req, Triggers::default()).await? {
        Admission::Replay(answer) => return Ok(answer),
        Admission::New(pending) => pending,
    };
    let order_id = body.order_id;
    let record = Charge::load(&mut pending.tx, &order_id).await?;
    let (status, refunded_cents) = match record {
        Some(mut record) if record.status == "charged" => {
            record.status = "refunded".to_owned();
            record.save(&mut pending.tx).await?;
            effects::bump(&mut pending.tx, &order_id, "refund").await?;
            ("refunded", record.amount_cents)
        }
        Some(mut record) if record.status == "requires_action" => {
            record.status = "cancelled".to_owned();
            record.save(&mut pending.tx).await?;
            ("cancelled", 0)
        }
        _ => ("none", 0),
    };
    let answer = json!({ "order_id": order_id, "status": status, "refunded_cents": refunded_cents });
    pending.finish(&req, Answer::json(StatusCode::OK, &answer)).await
}
