-- apijongler schema, version 8: limits learned from the provider's answers, and tokens (README
-- "Declared limits (pacing)").
--
-- A 429 whose QuotaFailure states its limit (`quotaValue`) teaches that limit to the quota scope that got
-- it, for the model it names, until the provider's next midnight: claims then reserve against it as
-- against a declared one. `limit_text` is written as the keyring writes a limit (`10/min`, `250/day`,
-- `250000 tokens/min`).
CREATE TABLE learned_limits (
    connector   TEXT    NOT NULL,
    quota_scope TEXT    NOT NULL,  -- 'group:NAME', 'project:NUMBER' or 'key:NAME'
    model       TEXT    NOT NULL,
    quota_id    TEXT    NOT NULL,  -- the provider's quota, e.g. GenerateRequestsPerMinutePerProjectPerModel-FreeTier
    limit_text  TEXT    NOT NULL,
    until       INTEGER NOT NULL,  -- unix ms: forgotten then (the provider's next midnight)
    learned_at  INTEGER NOT NULL,  -- unix ms
    key_name    TEXT    NOT NULL,  -- the key whose answer taught it
    PRIMARY KEY (connector, quota_scope, model, quota_id)
);

-- The input tokens a reservation counts against token limits: an estimate from the request's size when
-- it is made, the answer's own count (`usageMetadata.promptTokenCount`, `usage.prompt_tokens`) once its
-- lease ends. Rows of earlier versions counted no tokens.
ALTER TABLE reservations ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0;
CREATE INDEX reservations_by_lease ON reservations (connector, key_name, lease);

-- The input tokens the answer said the request used, where it said so.
ALTER TABLE requests ADD COLUMN prompt_tokens INTEGER;
