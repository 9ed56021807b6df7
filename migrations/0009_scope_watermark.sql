-- apijongler schema, version 9. PostgreSQL's version 9 (`migrations/postgres/0009_scope_watermark.sql`)
-- keeps a watermark per key so that its claims need not read `lockdowns` and `learned_limits` for keys
-- none of whose scopes carry a row there. SQLite needs none: its claims run against one writer, not
-- against each extra relation's cost per statement. This version changes nothing here and keeps the
-- two stores' numbers the same.
SELECT 1;
