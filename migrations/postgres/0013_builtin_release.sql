-- The release of the host that installed or last upgraded a built-in definition (NULL for an
-- admin's, and for a built-in installed before this column): a host upgrades a built-in only
-- to its own release's when that is not older, so that during a rolling upgrade a replica of
-- the old release that restarts does not put its plugins back for every replica.
ALTER TABLE saga_definitions ADD COLUMN builtin_release TEXT;
-- A column without a default: PostgreSQL adds it to the catalog without rewriting the table.
