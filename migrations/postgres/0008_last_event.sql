-- The event id of the saga's last committed transition. A transition's statements after the
-- fenced update of the saga row apply only where this is their own event id, so they can run
-- as one script (SQLite: one round trip to the connection's thread) and still write nothing
-- when the fence refused the update.
ALTER TABLE sagas ADD COLUMN last_event_id TEXT;
