//! The embedded sink: appends each event as one JSON line to a file (`./data/events.jsonl`).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use super::{Published, Sink};
use crate::store::OutboxRow;

/// Appends events to a JSON-lines file and fsyncs before confirming.
pub struct JsonlSink {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
}

impl JsonlSink {
    pub async fn open(path: &Path) -> std::io::Result<JsonlSink> {
        let file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
        Ok(JsonlSink { path: path.to_owned(), file: Mutex::new(file) })
    }
}

#[async_trait]
impl Sink for JsonlSink {
    fn name(&self) -> String {
        format!("jsonl:{}", self.path.display())
    }

    async fn publish(&self, rows: &[OutboxRow]) -> Published {
        match self.append(rows).await {
            Ok(()) => Published { acked: rows.len(), error: None },
            Err(e) => Published {
                acked: 0,
                error: Some(anyhow::Error::new(e).context(format!("appending to {}", self.path.display()))),
            },
        }
    }
}

impl JsonlSink {
    /// Appends the rows as lines and fsyncs: the whole batch is on disk, or is sent again.
    async fn append(&self, rows: &[OutboxRow]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(rows.iter().map(|r| r.payload.len() + 1).sum());
        for row in rows {
            buf.extend_from_slice(row.payload.as_bytes());
            buf.push(b'\n');
        }
        let mut file = self.file.lock().await;
        file.write_all(&buf).await?;
        file.sync_data().await?;
        Ok(())
    }
}
