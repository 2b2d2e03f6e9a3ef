//! The payment service's webhook to sagahost: after a 3-D Secure confirmation, signal the
//! waiting saga with `payment-confirmed`.
//!
//! Delivery goes through a small outbox: the confirmation inserts a `webhooks` row in the same
//! transaction that charges, and a background task sends it, retrying on any failure or
//! non-2xx answer (sagahost answers 409 while the saga is not yet waiting for the signal).
//! A row still pending when the process stops (or is killed) is sent again on the next start,
//! so a confirmation is never silently lost. Delivery is at least once; each request carries an
//! `Idempotency-Key` derived from the row, so sagahost replays its first answer to a re-send.

use std::time::Duration;

use sqlx::{SqliteConnection, SqlitePool};
use tokio_util::sync::CancellationToken;

/// The outbox table, in the payment database.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS webhooks (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id   TEXT NOT NULL,
    charge_id  TEXT NOT NULL,
    status     TEXT NOT NULL DEFAULT 'pending', -- pending | delivered | failed
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
";

/// Attempts per delivery (per process start).
const ATTEMPTS: u32 = 20;
/// Pause between attempts.
const PAUSE: Duration = Duration::from_millis(250);
/// Bound on one attempt, connection included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to signal sagahost. Cheap to clone.
#[derive(Clone)]
pub struct Webhook {
    client: reqwest::Client,
    sagahost_url: String,
    token: Option<String>,
    saga_type: String,
    db: SqlitePool,
    shutdown: CancellationToken,
}

impl Webhook {
    /// A sender for `POST {sagahost_url}/sagas/{saga_type}/{order_id}/signals/payment-confirmed`.
    pub fn new(
        sagahost_url: &str,
        token: Option<String>,
        saga_type: String,
        db: SqlitePool,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Webhook> {
        let client = reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build()?;
        let sagahost_url = sagahost_url.trim_end_matches('/').to_owned();
        Ok(Webhook { client, sagahost_url, token, saga_type, db, shutdown })
    }

    /// Queues a signal for `order_id`; call inside the confirming transaction, then
    /// [`Webhook::spawn`] the returned id after the commit.
    pub async fn enqueue(conn: &mut SqliteConnection, order_id: &str, charge_id: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("INSERT INTO webhooks (order_id, charge_id) VALUES (?, ?) RETURNING id")
            .bind(order_id)
            .bind(charge_id)
            .fetch_one(conn)
            .await
    }

    /// Sends every pending row again: the ones a previous run did not finish.
    pub async fn resume(&self) -> Result<(), sqlx::Error> {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM webhooks WHERE status = 'pending' ORDER BY id")
            .fetch_all(&self.db)
            .await?;
        for id in ids {
            self.spawn(id);
        }
        Ok(())
    }

    /// Delivers row `id` in the background.
    pub fn spawn(&self, id: i64) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.deliver(id).await {
                tracing::error!(id, error = %e, "payment webhook: cannot read or update the outbox");
            }
        });
    }

    async fn deliver(&self, id: i64) -> Result<(), sqlx::Error> {
        let (order_id, charge_id): (String, String) =
            sqlx::query_as("SELECT order_id, charge_id FROM webhooks WHERE id = ?")
                .bind(id)
                .fetch_one(&self.db)
                .await?;
        let url = format!("{}/sagas/{}/{}/signals/payment-confirmed", self.sagahost_url, self.saga_type, order_id);
        let body = serde_json::json!({ "charge_id": charge_id });
        for attempt in 1..=ATTEMPTS {
            let mut request = self
                .client
                .post(&url)
                .header("idempotency-key", format!("payment-confirmed:{order_id}:{id}"))
                .json(&body);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            let error = match request.send().await {
                Ok(resp) if resp.status().is_success() => {
                    tracing::info!(id, %order_id, attempt, "payment webhook delivered");
                    self.record(id, "delivered", None).await?;
                    return Ok(());
                }
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    format!("sagahost answered {status}: {}", text.chars().take(300).collect::<String>())
                }
                Err(e) => format!("cannot reach sagahost: {e}"),
            };
            if attempt == ATTEMPTS {
                tracing::error!(id, %order_id, %url, %error, "payment webhook: giving up after {ATTEMPTS} attempts; signal the saga by hand");
                return self.record(id, "failed", Some(&error)).await;
            }
            tracing::warn!(id, %order_id, attempt, %url, %error, "payment webhook attempt failed; retrying");
            self.record(id, "pending", Some(&error)).await?;
            tokio::select! {
                () = tokio::time::sleep(PAUSE) => {}
                // Stays pending: the next start sends it again.
                () = self.shutdown.cancelled() => return Ok(()),
            }
        }
        Ok(())
    }

    /// Records one attempt's outcome.
    async fn record(&self, id: i64, status: &str, error: Option<&str>) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE webhooks SET status = ?, attempts = attempts + 1, last_error = ? WHERE id = ?")
            .bind(status)
            .bind(error)
            .bind(id)
            .execute(&self.db)
            .await?;
        Ok(())
    }
}
