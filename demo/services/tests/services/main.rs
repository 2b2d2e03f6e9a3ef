//! End-to-end tests of the demo services: the real services on port 0 with a fresh data
//! directory, real HTTP, and assertions on the answers and the effect counters.
//!
//! `inventory`, `payment` and `shipping` test each service's contract and triggers; `rules`
//! the rules all three share (keys, errors, concurrency); `process` the real binary (stdout
//! line, SIGKILL and restart, SIGTERM).

mod common;
mod inventory;
mod payment;
mod process;
mod rules;
mod shipping;
