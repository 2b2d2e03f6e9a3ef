//! The shipping service: one shipment per order, effects `create` and `cancel`.
//!
//! Trigger: `ship_to.country == "XX"` has no carrier (422, stored, no effect).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::effects;
use crate::error::{non_empty, parse_json, ApiError};
use crate::idempotency::{Answer, Keyed};
use crate::server::{Admission, Core, Triggers};

/// The service name, also the database file name.
pub const NAME: &str = "shipping";
/// The effects this service counts.
pub const EFFECTS: &[&str] = &["create", "cancel"];

/// The domain table. One row per order; a new key creates again (and counts again).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS shipments (
    order_id   TEXT PRIMARY KEY,
    ship_to    TEXT NOT NULL,
    items      TEXT NOT NULL,
    status     TEXT NOT NULL, -- created | cancelled
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
";

#[derive(Debug, Deserialize)]
struct ShipmentRequest {
    order_id: String,
    ship_to: ShipTo,
    /// Stored as given; the demo does not look inside.
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct ShipTo {
    country: String,
    /// Name, address lines and the rest: stored as given.
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// The service's routes, with `core` as their state.
pub fn routes(core: Core) -> Router {
    Router::new()
        .route("/shipments", post(create))
        .route("/shipments/{order_id}", get(show))
        .route("/shipments/{order_id}/cancel", post(cancel))
        .with_state(core)
}

fn view(order_id: &str, status: &str) -> serde_json::Value {
    json!({
        "shipment_id": format!("shp_{order_id}"),
        "order_id": order_id,
        "tracking": format!("TRK-{order_id}"),
        "status": status,
    })
}

async fn create(State(core): State<Core>, req: Keyed) -> Result<Answer, ApiError> {
    let body: ShipmentRequest = parse_json(&req.body)?;
    non_empty("order_id", &body.order_id)?;
    non_empty("ship_to.country", &body.ship_to.country)?;
    let mut pending = match core.admit(&req, Triggers::default()).await? {
        Admission::Replay(answer) => return Ok(answer),
        Admission::New(pending) => pending,
    };
    let country = body.ship_to.country;
    if country == "XX" {
        let answer =
            Answer::json(StatusCode::UNPROCESSABLE_ENTITY, &json!({ "error": format!("no carrier for {country}") }));
        return pending.finish(&req, answer).await;
    }
    let mut ship_to = body.ship_to.rest;
    ship_to.insert("country".to_owned(), country.into());
    sqlx::query(
        "INSERT INTO shipments (order_id, ship_to, items, status) VALUES (?, ?, ?, 'created')
         ON CONFLICT (order_id) DO UPDATE SET ship_to = excluded.ship_to, items = excluded.items,
             status = 'created', updated_at = excluded.updated_at",
    )
    .bind(&body.order_id)
    .bind(serde_json::Value::Object(ship_to).to_string())
    .bind(serde_json::Value::Array(body.items).to_string())
    .execute(&mut *pending.tx)
    .await?;
    effects::bump(&mut pending.tx, &body.order_id, "create").await?;
    pending.finish(&req, Answer::json(StatusCode::CREATED, &view(&body.order_id, "created"))).await
}

async fn cancel(State(core): State<Core>, Path(order_id): Path<String>, req: Keyed) -> Result<Answer, ApiError> {
    let mut pending = match core.admit(&req, Triggers::default()).await? {
        Admission::Replay(answer) => return Ok(answer),
        Admission::New(pending) => pending,
    };
    let cancelled = sqlx::query(
        "UPDATE shipments SET status = 'cancelled', updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
         WHERE order_id = ? AND status = 'created'",
    )
    .bind(&order_id)
    .execute(&mut *pending.tx)
    .await?
    .rows_affected()
        > 0;
    let answer = if cancelled {
        effects::bump(&mut pending.tx, &order_id, "cancel").await?;
        json!({ "order_id": order_id, "status": "cancelled" })
    } else {
        json!({ "order_id": order_id, "status": "none" })
    };
    pending.finish(&req, Answer::json(StatusCode::OK, &answer)).await
}

/// `GET /shipments/{order_id}`: the shipment record, for humans and tests (not in the plugins'
/// contract).
async fn show(State(core): State<Core>, Path(order_id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM shipments WHERE order_id = ?")
        .bind(&order_id)
        .fetch_optional(&core.db)
        .await?;
    let status = status.ok_or_else(|| ApiError::NotFound(format!("no shipment for order {order_id}")))?;
    Ok(Json(view(&order_id, &status)))
}
