//! The effects counter: how many times each effect (`reserve`, `charge`, `create`, ...) was
//! applied per order. Tests read it through `GET /effects/{order_id}` to prove "exactly once".
//!
//! A count is bumped in the transaction that applies the effect, never anywhere else.

use sqlx::{SqliteConnection, SqlitePool};

/// The counter table, created in every service's database.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS effects (
    order_id TEXT NOT NULL,
    effect   TEXT NOT NULL,
    count    INTEGER NOT NULL,
    PRIMARY KEY (order_id, effect)
);
";

/// Counts one application of `effect` to `order_id`.
pub async fn bump(conn: &mut SqliteConnection, order_id: &str, effect: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO effects (order_id, effect, count) VALUES (?, ?, 1)
         ON CONFLICT (order_id, effect) DO UPDATE SET count = count + 1",
    )
    .bind(order_id)
    .bind(effect)
    .execute(conn)
    .await?;
    Ok(())
}

/// `{"order_id": ..., "effects": {name: n}}` with every name of `names`, 0 when never applied.
pub async fn report(db: &SqlitePool, order_id: &str, names: &[&str]) -> Result<serde_json::Value, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT effect, count FROM effects WHERE order_id = ?").bind(order_id).fetch_all(db).await?;
    let mut effects = serde_json::Map::new();
    for name in names {
        effects.insert((*name).to_owned(), 0.into());
    }
    for (name, count) in rows {
        effects.insert(name, count.into());
    }
    Ok(serde_json::json!({ "order_id": order_id, "effects": effects }))
}
