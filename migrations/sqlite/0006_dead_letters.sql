-- Events a sink refused for good (larger than the broker accepts, say). The relay moves such
-- a row here and marks it published, so it no longer holds up the events behind it; operators
-- see it through GET /admin/dead-letters and the sagahost_dead_lettered_events_total metric.
CREATE TABLE dead_letters (
    outbox_id   INTEGER PRIMARY KEY,       -- the outbox row it was
    event_id    TEXT NOT NULL,
    saga_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    event_type  TEXT NOT NULL,
    payload     TEXT NOT NULL,             -- the event JSON as it would have been published
    reason      TEXT NOT NULL,             -- why the sink refused it
    at          INTEGER NOT NULL
);
