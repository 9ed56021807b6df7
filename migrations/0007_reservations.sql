-- apijongler schema, version 7: requests reserved against declared limits (README "Declared limits").
--
-- A claim for model M on a key of quota scope S, when the keyring declares limits for (S, M), counts
-- the rows of (S, M) in each window in its own transaction and adds one when every window has room:
-- no window ever holds more rows than its limit, whatever the number of processes. A window that is
-- full becomes an ordinary `lockdowns` row of (S, M) until it has room (quota_id `apijongler:paced`), so
-- claims, waits, `why` and `status` treat it as they treat any lockdown.
--
-- A row is written before the request is sent and never taken back: a request that was never sent
-- (its process killed) still counts, so the limit is never exceeded. Rows older than the connector's
-- longest window (at least 26 h), counted back from its newest earlier row, are deleted by its next
-- reservation, whatever their scope and model.
CREATE TABLE reservations (
    connector   TEXT    NOT NULL,
    quota_scope TEXT    NOT NULL,  -- 'group:NAME', 'project:NUMBER' or 'key:NAME'
    model       TEXT    NOT NULL,
    at          INTEGER NOT NULL,  -- unix ms of the claim
    key_name    TEXT    NOT NULL,  -- the key claimed
    lease       INTEGER NOT NULL   -- its lease
);

CREATE INDEX reservations_window ON reservations (connector, quota_scope, model, at);
CREATE INDEX reservations_by_age ON reservations (connector, at);
