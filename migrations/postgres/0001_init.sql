-- sagahost schema, PostgreSQL flavour. Kept in lockstep with migrations/sqlite/: the same
-- files, tables, columns and indexes; only the types differ (BIGINT for INTEGER, BYTEA for
-- BLOB, identity columns for AUTOINCREMENT).
-- Never edit a migration that has shipped: add a new one.
-- Times are integer milliseconds since the Unix epoch (UTC).

-- Uploaded plugin components, content-addressed. Every replica loads them from here.
CREATE TABLE plugins (
    digest      TEXT PRIMARY KEY,          -- 'sha256:<hex>'
    name        TEXT NOT NULL,             -- the plugin's state space
    size        BIGINT NOT NULL,
    wasm        BYTEA NOT NULL,
    uploaded_at BIGINT NOT NULL
);
CREATE INDEX plugins_by_name ON plugins (name, uploaded_at);

-- The current definition (steps and bindings) of each saga type. Running sagas keep the
-- snapshot they started with in sagas.definition.
CREATE TABLE saga_definitions (
    saga_type  TEXT PRIMARY KEY,
    definition TEXT NOT NULL,              -- JSON, engine::SagaDefinition
    source     TEXT NOT NULL,              -- 'builtin' or 'admin': built-ins may be upgraded in place
    updated_at BIGINT NOT NULL
);

CREATE TABLE sagas (
    id          TEXT PRIMARY KEY,          -- UUIDv7: sorts by creation time
    saga_type   TEXT NOT NULL,
    status      TEXT NOT NULL,             -- public label: CREATED, PAYMENT_CHARGED, ...
    phase       TEXT NOT NULL,             -- engine::Phase
    reason      TEXT,
    input       TEXT NOT NULL,             -- JSON
    definition  TEXT NOT NULL,             -- JSON snapshot pinned at start
    seq         BIGINT NOT NULL,           -- last outbox seq issued for this saga
    next_run_at BIGINT,                    -- NULL: terminal, or waiting on an outside event
    lease_owner TEXT,
    lease_until BIGINT,
    epoch       BIGINT NOT NULL DEFAULT 0, -- fencing token: bumped on every claim
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
-- The driver's work queue: only live sagas with a timer are in this index.
CREATE INDEX sagas_due ON sagas (next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX sagas_by_type ON sagas (saga_type, id);
CREATE INDEX sagas_by_status ON sagas (saga_type, status, id);

CREATE TABLE saga_steps (
    saga_id             TEXT NOT NULL REFERENCES sagas (id),
    idx                 BIGINT NOT NULL,
    name                TEXT NOT NULL,
    status              TEXT NOT NULL,     -- engine::StepStatus
    attempts            BIGINT NOT NULL,
    compensate_attempts BIGINT NOT NULL,
    output              TEXT,
    compensate_output   TEXT,
    last_error          TEXT,
    wait_signal         TEXT,
    signal_payload      TEXT,
    execute_digest      TEXT,
    compensate_digest   TEXT,
    started_at          BIGINT,
    finished_at         BIGINT,
    updated_at          BIGINT,
    PRIMARY KEY (saga_id, idx)
);

-- Each plugin's durable key-value space, written only in the transaction of a step result.
-- COLLATE "C": keys compare bytewise, as in SQLite, so prefix range scans mean the same.
CREATE TABLE plugin_state (
    plugin     TEXT NOT NULL,
    key        TEXT COLLATE "C" NOT NULL,
    value      BYTEA NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (plugin, key)
);

-- The transactional outbox: one row per saga transition, written in the transition's
-- transaction. (saga_id, seq) is unique and gapless per saga.
CREATE TABLE outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     TEXT NOT NULL UNIQUE,
    saga_id      TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    event_type   TEXT NOT NULL,
    payload      TEXT NOT NULL,            -- the full event JSON, as published
    created_at   BIGINT NOT NULL,
    published_at BIGINT,
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
    response_status  BIGINT,               -- NULL while the first request is in flight
    response_body    BYTEA,
    locked_until     BIGINT NOT NULL,      -- an in-flight claim older than this was abandoned
    created_at       BIGINT NOT NULL,
    expires_at       BIGINT NOT NULL,
    PRIMARY KEY (caller, route, key)
);
CREATE INDEX idempotency_expiry ON idempotency_keys (expires_at);
