//! Test-only crate: the end-to-end suite lives in `e2e/`.
