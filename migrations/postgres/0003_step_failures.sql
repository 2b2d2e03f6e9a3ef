-- Retry policies count failed attempts, not calls: a step that polls with `wait` must not use
-- up its retries. `waited` remembers that a step committed writes with a `wait`, so it is
-- compensated even if a later attempt of it fails.
ALTER TABLE saga_steps ADD COLUMN failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE saga_steps ADD COLUMN waited BIGINT NOT NULL DEFAULT 0;
