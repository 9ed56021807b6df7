-- The PostgreSQL store's schema, in the schema `apijongler` (apijongler creates it on first use and never
-- touches another). Versions count as SQLite's do (`migrations/NNNN_*.sql`): PostgreSQL support began at
-- version 8, so this first file is version 8, the same tables as SQLite's migrations 1 to 8 give; later
-- versions add a file of the same number to both folders. Times are unix milliseconds on the clock of the
-- process that wrote them, except `heartbeat_db_at`, the server's.

CREATE TABLE keys (
    id                   BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    connector            TEXT    NOT NULL,
    key_name             TEXT    NOT NULL,
    fingerprint          TEXT    NOT NULL,
    state                TEXT    NOT NULL DEFAULT 'vacant'
                         CHECK (state IN ('vacant', 'locked', 'lockdown', 'error')),
    retired_at           BIGINT,
    lease                BIGINT  NOT NULL DEFAULT 0,
    holder_host          TEXT,
    holder_boot_id       TEXT,
    holder_pid_namespace TEXT,    -- inode of the holder's /proc/self/ns/pid
    holder_pid           BIGINT,
    holder_started       BIGINT,  -- process start time, clock ticks since boot (/proc/<pid>/stat field 22)
    locked_at            BIGINT,
    heartbeat_at         BIGINT,  -- the holder's clock
    heartbeat_boot_ms    BIGINT,  -- CLOCK_BOOTTIME ms of the holder's host at its last heartbeat
    heartbeat_db_at      BIGINT,  -- the server's clock (now()) at the last heartbeat: liveness across hosts
    lockdown_until       BIGINT,
    reason               TEXT,    -- why the last lockdown or error happened
    http_status          BIGINT,  -- the upstream status behind that reason, if any
    lockdown_count       BIGINT  NOT NULL DEFAULT 0,
    uses                 BIGINT  NOT NULL DEFAULT 0,
    last_used_at         BIGINT  NOT NULL DEFAULT 0,
    created_at           BIGINT  NOT NULL,
    quota_group          TEXT,
    project_learned      TEXT,
    quota_scope          TEXT    GENERATED ALWAYS AS
                         (coalesce('group:' || quota_group, 'project:' || project_learned, 'key:' || key_name)) STORED,
    UNIQUE (connector, key_name)
);

CREATE INDEX keys_held ON keys (connector) WHERE state = 'locked';
CREATE INDEX keys_lru ON keys (connector, last_used_at)
    WHERE state IN ('vacant', 'lockdown') AND retired_at IS NULL;
CREATE INDEX keys_by_scope ON keys (connector, quota_scope);
CREATE INDEX keys_scope_lru ON keys (connector, quota_scope, last_used_at)
    WHERE state IN ('vacant', 'lockdown') AND retired_at IS NULL;

CREATE TABLE history (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              BIGINT NOT NULL,
    connector       TEXT   NOT NULL,
    key_name        TEXT   NOT NULL,
    fingerprint     TEXT   NOT NULL, -- of the secret the key had at the time
    from_state      TEXT,            -- NULL when the key first appears
    to_state        TEXT   NOT NULL, -- a key state, or 'retired' when the key left the keyring
    reason          TEXT   NOT NULL,
    http_status     BIGINT,
    holder_pid      BIGINT,
    lease           BIGINT,
    lockdown_until  BIGINT,
    model           TEXT,
    quota_scope     TEXT,
    event           TEXT   NOT NULL DEFAULT 'unclassified'
);

CREATE INDEX history_by_key  ON history (connector, key_name, at);
CREATE INDEX history_by_time ON history (at);

CREATE TABLE requests (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at            BIGINT NOT NULL,  -- when the attempt started, unix ms
    connector     TEXT   NOT NULL,
    key_name      TEXT,             -- NULL for connectors that need no key
    method        TEXT   NOT NULL,
    endpoint      TEXT   NOT NULL,  -- path only, no query string
    status        BIGINT,           -- NULL when no answer came (timeout, connection error)
    latency_ms    BIGINT NOT NULL,
    outcome       TEXT   NOT NULL,  -- what the answer meant: success, rate limited, bad key, ...
    model         TEXT,
    quota_scope   TEXT,
    prompt_tokens BIGINT
);

CREATE INDEX requests_by_key  ON requests (connector, key_name, at);
CREATE INDEX requests_by_time ON requests (at);

CREATE TABLE lockdowns (
    connector    TEXT   NOT NULL,
    scope        TEXT   NOT NULL,  -- 'group:NAME', 'project:NUMBER' or 'key:NAME'
    model        TEXT   NOT NULL,  -- a model name, or '*' for every model
    until        BIGINT NOT NULL,  -- unix ms
    quota_id     TEXT,
    reason       TEXT   NOT NULL,
    http_status  BIGINT,
    set_by_key   TEXT   NOT NULL,  -- the key whose answer set it
    set_at       BIGINT NOT NULL,
    strikes      BIGINT NOT NULL DEFAULT 1,  -- consecutive lockdowns of this scope and model (escalation)
    PRIMARY KEY (connector, scope, model)
);

CREATE TABLE resources (
    connector   TEXT   NOT NULL,
    name        TEXT   NOT NULL,
    key_name    TEXT   NOT NULL,
    quota_scope TEXT   NOT NULL,
    expires_at  BIGINT,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (connector, name)
);

CREATE INDEX resources_by_expiry ON resources (connector, expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE reservations (
    connector   TEXT   NOT NULL,
    quota_scope TEXT   NOT NULL,
    model       TEXT   NOT NULL,
    at          BIGINT NOT NULL,  -- unix ms of the claim
    key_name    TEXT   NOT NULL,  -- the key claimed
    lease       BIGINT NOT NULL,  -- its lease
    tokens      BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX reservations_window ON reservations (connector, quota_scope, model, at);
CREATE INDEX reservations_by_age ON reservations (connector, at);
CREATE INDEX reservations_by_lease ON reservations (connector, key_name, lease);

CREATE TABLE learned_limits (
    connector   TEXT   NOT NULL,
    quota_scope TEXT   NOT NULL,
    model       TEXT   NOT NULL,
    quota_id    TEXT   NOT NULL,
    limit_text  TEXT   NOT NULL,
    until       BIGINT NOT NULL,  -- unix ms: forgotten then (the provider's next midnight)
    learned_at  BIGINT NOT NULL,  -- unix ms
    key_name    TEXT   NOT NULL,  -- the key whose answer taught it
    PRIMARY KEY (connector, quota_scope, model, quota_id)
);
