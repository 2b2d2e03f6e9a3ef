//! The inventory service: reservations per order, effects `reserve` and `release`.
//!
//! Triggers by SKU prefix: `OOS-` is out of stock (409, stored), `FLAKY-` fails the first two
//! requests of a key with 503, `SLOW-` sleeps `--slow-ms` on the first request of a key,
//! `HUGE-` answers with a 2 MiB padding string. Stock itself is not modelled: every other SKU
//! is available in any quantity.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::effects;
use crate::error::{non_empty, parse_json, ApiError};
use crate::idempotency::{Answer, Keyed};
use crate::server::{Admission, Core, Triggers};

/// The service name, also the database file name.
pub const NAME: &str = "inventory";
/// The effects this service counts.
pub const EFFECTS: &[&str] = &["reserve", "release"];
/// Size of the `padding` string a `HUGE-` reservation answers with.
pub const HUGE_PADDING: usize = 2 * 1024 * 1024;

/// The domain table. One row per order; a new key re-reserves (and counts again).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS reservations (
    order_id   TEXT PRIMARY KEY,
    items      TEXT NOT NULL,
    status     TEXT NOT NULL,
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
";

#[derive(Debug, Deserialize)]
struct ReserveRequest {
    order_id: String,
    items: Vec<Item>,
}

#[derive(Debug, Deserialize, Serialize)]
struct Item {
    sku: String,
    quantity: u64,
}

/// The service's routes, with `core` as their state.
pub fn routes(core: Core, slow: Duration) -> Router {
    Router::new()
        .route("/reservations", post(reserve))
        .route("/reservations/{order_id}", get(show))
        .route("/reservations/{order_id}/release", post(release))
        .with_state(Inventory { core, slow })
}

#[derive(Clone)]
struct Inventory {
    core: Core,
    slow: Duration,
}

async fn reserve(State(svc): State<Inventory>, req: Keyed) -> Result<Answer, ApiError> {
    let body: ReserveRequest = parse_json(&req.body)?;
    non_empty("order_id", &body.order_id)?;
    if body.items.is_empty() {
        return Err(ApiError::BadRequest("field `items` must list at least one item".to_owned()));
    }
    let has = |prefix: &str| body.items.iter().any(|i| i.sku.starts_with(prefix));
    let triggers = Triggers {
        flaky: has("FLAKY-").then_some("inventory temporarily unavailable"),
        slow: has("SLOW-").then_some(svc.slow),
    };
    let mut pending = match svc.core.admit(&req, triggers).await? {
        Admission::Replay(answer) => return Ok(answer),
        Admission::New(pending) => pending,
    };
    if let Some(item) = body.items.iter().find(|i| i.sku.starts_with("OOS-")) {
        let answer = Answer::json(StatusCode::CONFLICT, &json!({ "error": "out of stock", "sku": item.sku }));
        return pending.finish(&req, answer).await;
    }
    let items = serde_json::to_value(&body.items).map_err(anyhow::Error::from)?;
    sqlx::query(
        "INSERT INTO reservations (order_id, items, status) VALUES (?, ?, 'reserved')
         ON CONFLICT (order_id) DO UPDATE SET items = excluded.items, status = 'reserved',
             updated_at = excluded.updated_at",
    )
    .bind(&body.order_id)
    .bind(items.to_string())
    .execute(&mut *pending.tx)
    .await?;
    effects::bump(&mut pending.tx, &body.order_id, "reserve").await?;
    let mut answer = json!({
        "reservation_id": format!("res_{}", body.order_id),
        "order_id": body.order_id,
        "items": items,
        "status": "reserved",
    });
    if has("HUGE-") {
        answer["padding"] = "x".repeat(HUGE_PADDING).into();
    }
    pending.finish(&req, Answer::json(StatusCode::CREATED, &answer)).await
}

async fn release(State(svc): State<Inventory>, Path(order_id): Path<String>, req: Keyed) -> Result<Answer, ApiError> {
    // The body carries nothing; it must be empty or a JSON object (`{}`).
    if !req.body.iter().all(u8::is_ascii_whitespace) {
        let _: serde_json::Map<String, serde_json::Value> = parse_json(&req.body)?;
    }
    let mut pending = match svc.core.admit(&req, Triggers::default()).await? {
        Admission::Replay(answer) => return Ok(answer),
        Admission::New(pending) => pending,
    };
    let released = sqlx::query(
        "UPDATE reservations SET status = 'released', updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         WHERE order_id = ? AND status = 'reserved'",
    )
    .bind(&order_id)
    .execute(&mut *pending.tx)
    .await?
    .rows_affected()
        > 0;
    let answer = if released {
        effects::bump(&mut pending.tx, &order_id, "release").await?;
        json!({ "order_id": order_id, "status": "released", "released": true })
    } else {
        json!({ "order_id": order_id, "status": "none", "released": false })
    };
    pending.finish(&req, Answer::json(StatusCode::OK, &answer)).await
}

/// `GET /reservations/{order_id}`: the reservation record, for humans and tests (not in the
/// plugins' contract).
async fn show(State(svc): State<Inventory>, Path(order_id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let row: Option<(String, String)> = sqlx::query_as("SELECT items, status FROM reservations WHERE order_id = ?")
        .bind(&order_id)
        .fetch_optional(&svc.core.db)
        .await?;
    let (items, status) = row.ok_or_else(|| ApiError::NotFound(format!("no reservation for order {order_id}")))?;
    let items: serde_json::Value = serde_json::from_str(&items).map_err(anyhow::Error::from)?;
    Ok(Json(json!({
        "reservation_id": format!("res_{order_id}"),
        "order_id": order_id,
        "items": items,
        "status": status,
    })))
}
