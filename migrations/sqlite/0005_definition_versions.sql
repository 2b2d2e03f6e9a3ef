-- Definitions carry a version for compare-and-set: a change based on version n commits only
-- if the stored definition is still at n, so concurrent binds and definition changes cannot
-- overwrite each other silently (the loser gets 409 and retries on the new version).
ALTER TABLE saga_definitions ADD COLUMN version INTEGER NOT NULL DEFAULT 1;

-- Retention of finished sagas (--saga-retention-hours) scans finished sagas by age.
CREATE INDEX sagas_finished ON sagas (updated_at) WHERE phase IN ('completed', 'cancelled');
