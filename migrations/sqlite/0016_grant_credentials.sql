-- Credentials the host adds to a plugin's requests to its granted origins: a JSON array of
-- {origin, header, value} (grants::normalize_credentials), the value a template naming secrets
-- of the host's --outbound-secrets-dir (`Bearer ${stripe-key}`), never a secret itself: the
-- secrets stay in the host's files, and this column holds only which one goes where.
ALTER TABLE plugin_grants ADD COLUMN credentials TEXT NOT NULL DEFAULT '[]';
