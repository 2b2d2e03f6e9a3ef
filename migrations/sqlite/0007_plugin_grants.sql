-- Origins each plugin may reach over outbound HTTP (SPEC §4.1), set by an admin through
-- PUT /admin/plugins/{name}/grants. They live only here, not in the catalog, so every replica
-- sees a change at once. No row, or an empty list: nothing granted.
CREATE TABLE plugin_grants (
    plugin        TEXT PRIMARY KEY,
    allowed_hosts TEXT NOT NULL,           -- JSON array of canonical origins (grants::normalize)
    updated_at    INTEGER NOT NULL
);
