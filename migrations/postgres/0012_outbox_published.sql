-- Published outbox rows by when they were published: the janitor's purge deletes those past
-- the retention oldest first, in batches, and its last batch of a pass must find that no more
-- are due without reading every row still kept (a whole-table scan each pass, which on SQLite
-- held the one writer for as long). One more index entry per row as it is marked published.
-- Built in the migration's transaction (not CONCURRENTLY, which cannot be, and whose failure
-- would leave an invalid index behind): outbox writes of replicas still on the old release wait
-- for the build, about a second per million rows kept, within their 10 s lock_timeout.
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
