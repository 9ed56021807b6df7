-- apijongler schema, version 1. Append-only: never edit a released migration, add the next one.
--
-- All times are INTEGER unix milliseconds computed by the library (never SQLite's clock), so tests can
-- inject a clock and SQL can compare and subtract them.

-- One row per configured key. The secret itself is never stored: only its short SHA-256 fingerprint.
CREATE TABLE keys (
    id                INTEGER PRIMARY KEY,
    connector         TEXT    NOT NULL,
    key_name          TEXT    NOT NULL,
    fingerprint       TEXT    NOT NULL,
    state             TEXT    NOT NULL DEFAULT 'vacant'
                      CHECK (state IN ('vacant', 'locked', 'lockdown', 'error')),
    -- Set when the key disappeared from the keyring: never claimed again, history kept.
    retired_at        INTEGER,
    -- Fencing token: incremented by every claim; every write by a holder names the lease it holds.
    lease             INTEGER NOT NULL DEFAULT 0,
    holder_host       TEXT,
    holder_boot_id    TEXT,
    holder_pid        INTEGER,
    holder_started    INTEGER,   -- process start time, clock ticks since boot (/proc/<pid>/stat field 22)
    locked_at         INTEGER,
    heartbeat_at      INTEGER,
    lockdown_until    INTEGER,
    reason            TEXT,      -- why the last lockdown or error happened
    http_status       INTEGER,   -- the upstream status behind that reason, if any
    lockdown_count    INTEGER NOT NULL DEFAULT 0,  -- consecutive lockdowns, for escalating defaults
    uses              INTEGER NOT NULL DEFAULT 0,
    last_used_at      INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    UNIQUE (connector, key_name)
);

-- The claim walks this index in least-recently-used order and stops at the first usable key, so it costs
-- the same with 4 keys or 10,000. Held and error keys are not in it at all.
CREATE INDEX keys_claim_order ON keys (connector, last_used_at)
    WHERE state IN ('vacant', 'lockdown') AND retired_at IS NULL;

-- The reaper and the heartbeat look only at held keys.
CREATE INDEX keys_held ON keys (connector) WHERE state = 'locked';

-- Append-only: one row per state transition, written in the same transaction as the transition.
CREATE TABLE history (
    id              INTEGER PRIMARY KEY,
    at              INTEGER NOT NULL,
    connector       TEXT    NOT NULL,
    key_name        TEXT    NOT NULL,
    fingerprint     TEXT    NOT NULL, -- of the secret the key had at the time
    from_state      TEXT,             -- NULL when the key first appears
    to_state        TEXT    NOT NULL, -- a key state, or 'retired' when the key left the keyring
    reason          TEXT    NOT NULL,
    http_status     INTEGER,
    holder_pid      INTEGER,
    lease           INTEGER,
    lockdown_until  INTEGER
);

CREATE INDEX history_by_key  ON history (connector, key_name, at);
CREATE INDEX history_by_time ON history (at);
