-- Audit trail of operator and admin actions: who did what to which saga or plugin, when, and
-- the state before and after. Written in the same transaction as the action itself.
CREATE TABLE audit_log (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,              -- e.g. saga.retry, saga.resolve, plugin.upload, binding.change
    target  TEXT NOT NULL,              -- saga id, plugin digest, saga type/step
    before  TEXT,                       -- JSON
    after   TEXT,                       -- JSON
    note    TEXT
);
CREATE INDEX audit_by_target ON audit_log (target, id);
