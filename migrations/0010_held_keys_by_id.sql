-- apijongler schema, version 10. PostgreSQL's version 10 (`migrations/postgres/0010_held_keys_by_id.sql`)
-- keys its index of held keys by id, so that its planner never walks every held key for a write fenced by
-- one lease. SQLite needs none: it finds a row by its integer primary key whatever other index matches.
-- This version changes nothing here and keeps the two stores' numbers the same.
SELECT 1;
