-- apijongler schema, version 2: every upstream attempt, so "how many requests did key2 make today" is one
-- query. Append-only; the secret is never here, and the endpoint is stored without its query string.
CREATE TABLE requests (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,  -- when the attempt started, unix ms
    connector   TEXT    NOT NULL,
    key_name    TEXT,              -- NULL for connectors that need no key
    method      TEXT    NOT NULL,
    endpoint    TEXT    NOT NULL,  -- path only, no query string
    status      INTEGER,           -- NULL when no answer came (timeout, connection error)
    latency_ms  INTEGER NOT NULL,
    outcome     TEXT    NOT NULL   -- what the answer meant: success, rate limited, bad key, ...
);

CREATE INDEX requests_by_key  ON requests (connector, key_name, at);
CREATE INDEX requests_by_time ON requests (at);
