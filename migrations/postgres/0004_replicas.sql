-- Several host processes on one database (PostgreSQL replicas; SQLite is one process, but the
-- same tables keep both stores alike).

-- Exactly one relay publishes at a time, so one saga's events leave in seq order. The lease is
-- measured in database time; the epoch counts leadership changes.
CREATE TABLE relay_lease (
    name  TEXT PRIMARY KEY,                -- 'outbox'
    owner TEXT NOT NULL,
    lease_until BIGINT NOT NULL,
    epoch BIGINT NOT NULL
);

-- Bumped in the transaction of every plugin upload and definition change, so that every
-- replica notices (by polling one row) that its in-memory catalog is stale.
CREATE TABLE catalog_version (
    id      BIGINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO catalog_version (id, version) VALUES (1, 0);
