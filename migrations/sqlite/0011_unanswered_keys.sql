-- The keys still waiting for their answer, by the saga they created: the janitor keeps a
-- finished saga while such a key names it (a retry of a request whose host died answers from
-- the saga), and looks them up here. Small: a key is answered within moments, or abandoned.
CREATE INDEX idempotency_unanswered ON idempotency_keys (saga_id) WHERE response_status IS NULL;
