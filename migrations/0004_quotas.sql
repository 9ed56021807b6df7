-- apijongler schema, version 4: quotas as the providers meter them, per model and per quota group.
--
-- Gemini meters quota per Google Cloud project and per model, so a 429 locks down one model (or every
-- model, '*') of one scope: a declared group, a project an answer revealed, or the key alone. Keys whose
-- scope is locked for a model are skipped by claims for that model and still serve the others.

-- Declared in the keyring's `[CONNECTOR groups]` section (NULL: the key is a group of its own).
ALTER TABLE keys ADD COLUMN quota_group TEXT;
-- The Google Cloud project number an error body revealed (`consumer: projects/NNN`), for ungrouped keys.
ALTER TABLE keys ADD COLUMN project_learned TEXT;
-- The scope the key's quota lockdowns are recorded under.
ALTER TABLE keys ADD COLUMN quota_scope TEXT GENERATED ALWAYS AS
    (coalesce('group:' || quota_group, 'project:' || project_learned, 'key:' || key_name)) VIRTUAL;
-- The key's place in the claim order: its last claim, or the end of the latest lockdown of its scopes when
-- that is later. Keys free for every model come first, so a claim for a model most keys are locked down
-- for still stops at the first key it looks at.
ALTER TABLE keys ADD COLUMN queue_at INTEGER NOT NULL DEFAULT 0;
UPDATE keys SET queue_at = max(last_used_at, coalesce(lockdown_until, 0));

-- The claim looks at the least recently used keys first (`keys_lru`), and when all of those are locked
-- down for the requested model, walks `keys_claim_order`, where keys locked down for a model sit behind
-- the keys free for it.
DROP INDEX keys_claim_order;
CREATE INDEX keys_lru ON keys (connector, last_used_at)
    WHERE state IN ('vacant', 'lockdown') AND retired_at IS NULL;
CREATE INDEX keys_claim_order ON keys (connector, queue_at, last_used_at)
    WHERE state IN ('vacant', 'lockdown') AND retired_at IS NULL;
CREATE INDEX keys_by_scope ON keys (connector, quota_scope);

-- One row per (scope, model) ever locked down; rows outlive their deadline to count strikes.
CREATE TABLE lockdowns (
    connector    TEXT    NOT NULL,
    scope        TEXT    NOT NULL,  -- 'group:NAME', 'project:NUMBER' or 'key:NAME'
    model        TEXT    NOT NULL,  -- a model name, or '*' for every model
    until        INTEGER NOT NULL,  -- unix ms
    quota_id     TEXT,              -- the provider's quota, e.g. GenerateRequestsPerDayPerProjectPerModel-FreeTier
    reason       TEXT    NOT NULL,
    http_status  INTEGER,
    set_by_key   TEXT    NOT NULL,  -- the key whose answer set it
    set_at       INTEGER NOT NULL,
    strikes      INTEGER NOT NULL DEFAULT 1,  -- consecutive lockdowns of this scope and model (escalation)
    PRIMARY KEY (connector, scope, model)
) WITHOUT ROWID;

-- Today's whole-key lockdowns become whole-scope ones (no key has a group yet, so the scope is the key).
INSERT INTO lockdowns (connector, scope, model, until, reason, http_status, set_by_key, set_at, strikes)
SELECT connector, 'key:' || key_name, '*', lockdown_until, coalesce(reason, 'lockdown'), http_status, key_name,
       last_used_at, max(lockdown_count, 1)
  FROM keys WHERE state = 'lockdown' AND lockdown_until IS NOT NULL;

-- The model a transition or an attempt was about (NULL: none), and the key's quota scope at the time.
ALTER TABLE history ADD COLUMN model TEXT;
ALTER TABLE history ADD COLUMN quota_scope TEXT;
ALTER TABLE requests ADD COLUMN model TEXT;
ALTER TABLE requests ADD COLUMN quota_scope TEXT;
