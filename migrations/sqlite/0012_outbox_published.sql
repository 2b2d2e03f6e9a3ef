-- Published outbox rows by when they were published: the janitor's purge deletes those past
-- the retention oldest first, in batches, and its last batch of a pass must find that no more
-- are due without reading every row still kept (a whole-table scan each pass, which on SQLite
-- held the one writer for as long). One more index entry per row as it is marked published.
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
