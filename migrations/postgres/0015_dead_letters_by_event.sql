-- Dead letters by event id: an operator redelivers or discards one by the id the listing shows
-- (`/admin/dead-letters/{event_id}`), and each of those read the whole table (several times in
-- a redelivery's transaction), which nothing ever purges.
CREATE INDEX dead_letters_by_event ON dead_letters (event_id);
