-- sagahost schema, SQLite flavour. Kept in lockstep with migrations/postgres/.
-- Never edit a migration that has shipped: add a new one.
-- Times are integer milliseconds since the Unix epoch (UTC).

-- Uploaded plugin components, content-addressed. Every replica loads them from here.
CREATE TABLE plugins (
    digest      TEXT PRIMARY KEY,          -- 'sha256:<hex>'
    name        TEXT NOT NULL,             -- the plugin's state space
    size        INTEGER NOT NULL,
    wasm        BLOB NOT NULL,
    uploaded_at INTEGER NOT NULL
);
CREATE INDEX plugins_by_name ON plugins (name, uploaded_at);

-- The current definition (steps and bindings) of each saga type. Running sagas keep the
-- snapshot they started with in sagas.definition.
CREATE TABLE saga_definitions (
    saga_type  TEXT PRIMARY KEY,
    definition TEXT NOT NULL,              -- JSON, engine::SagaDefinition
    source     TEXT NOT NULL,              -- 'builtin' or 'admin': built-ins may be upgraded in place
    updated_at INTEGER NOT NULL
);

CREATE TABLE sagas (
    id          TEXT PRIMARY KEY,          -- UUIDv7: sorts by creation time
    saga_type   TEXT NOT NULL,
    status      TEXT NOT NULL,             -- public label: CREATED, PAYMENT_CHARGED, ...
    phase       TEXT NOT NULL,             -- engine::Phase
    reason      TEXT,
    input       TEXT NOT NULL,             -- JSON
    definition  TEXT NOT NULL,             -- JSON snapshot pinned at start
    seq         INTEGER NOT NULL,          -- last outbox seq issued for this saga
    next_run_at INTEGER,                   -- NULL: terminal, or waiting on an outside event
    lease_owner TEXT,
    lease_until INTEGER,
    epoch       INTEGER NOT NULL DEFAULT 0, -- fencing token: bumped on every claim
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
-- The driver's work queue: only live sagas with a timer are in this index.
CREATE INDEX sagas_due ON sagas (next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX sagas_by_type ON sagas (saga_type, id);
CREATE INDEX sagas_by_status ON sagas (saga_type, status, id);

CREATE TABLE saga_steps (
    saga_id             TEXT NOT NULL REFERENCES sagas (id),
    idx                 INTEGER NOT NULL,
    name                TEXT NOT NULL,
    status              TEXT NOT NULL,     -- engine::StepStatus
    attempts            INTEGER NOT NULL,
    compensate_attempts INTEGER NOT NULL,
    output              TEXT,
    compensate_output   TEXT,
    last_error          TEXT,
    wait_signal         TEXT,
    signal_payload      TEXT,
    execute_digest      TEXT,
    compensate_digest   TEXT,
    started_at          INTEGER,
    finished_at         INTEGER,
    updated_at          INTEGER,
    PRIMARY KEY (saga_id, idx)
);

-- Each plugin's durable key-value space, written only in the transaction of a step result.
CREATE TABLE plugin_state (
    plugin     TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      BLOB NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (plugin, key)
);

-- The transactional outbox: one row per saga transition, written in the transition's
-- transaction. (saga_id, seq) is unique and gapless per saga.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    saga_id      TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    event_type   TEXT NOT NULL,
    payload      TEXT NOT NULL,            -- the full event JSON, as published
    created_at   INTEGER NOT NULL,
    published_at INTEGER,
    UNIQUE (saga_id, seq)
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- HTTP idempotency keys (draft-ietf-httpapi-idempotency-key-header, Stripe's storage rules).
CREATE TABLE idempotency_keys (
    caller           TEXT NOT NULL,
    route            TEXT NOT NULL,
    key              TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,        -- SHA-256 of the canonical request
    saga_id          TEXT,                 -- recovery point: the saga this key created
    response_status  INTEGER,              -- NULL while the first request is in flight
    response_body    BLOB,
    locked_until     INTEGER NOT NULL,     -- an in-flight claim older than this was abandoned
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    PRIMARY KEY (caller, route, key)
);
CREATE INDEX idempotency_expiry ON idempotency_keys (expires_at);
