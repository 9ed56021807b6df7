-- apijongler schema, version 6: which key created each per-project resource, so that a request naming it
-- goes to a key of the project that owns it (README "Resources and affinity").
--
-- Files, cached contents, batches and tuned models belong to the Google Cloud project of the key that
-- created them; any other project's key gets 403 "You do not have permission to access the File ... or it
-- may not exist". A row is learned from the creating answer (a file upload's `{"file":{"name":...}}`, a
-- `cachedContents` create, a batch or tuned model operation). Rows `uploads/<digest of the upload_id>`
-- (never the id itself, a capability) remember which key started a resumable upload, so that the file its
-- last chunk creates is that key's.
--
-- `quota_scope` is the owning key's scope when the row was written (its project, or `key:NAME`); a claim
-- reads the key's scope of now through `key_name`, and falls back on this one when the key is gone.
-- `expires_at` (unix ms; NULL: no known end) comes from the answer (`expirationTime`, `expireTime`) or a
-- default; rows past it are ignored, and deleted by the next write of the same connector's resources.
CREATE TABLE resources (
    connector   TEXT NOT NULL,
    name        TEXT NOT NULL,
    key_name    TEXT NOT NULL,
    quota_scope TEXT NOT NULL,
    expires_at  INTEGER,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (connector, name)
) WITHOUT ROWID;

CREATE INDEX resources_by_expiry ON resources (connector, expires_at) WHERE expires_at IS NOT NULL;

-- A claim pinned to a quota scope walks that scope's free keys alone, least recently used first (the
-- same partial condition as `keys_lru`, so that the planner can use it).
CREATE INDEX keys_scope_lru ON keys (connector, quota_scope, last_used_at)
    WHERE state IN ('vacant', 'lockdown') AND retired_at IS NULL;
