-- apijongler schema, version 10 (PostgreSQL): the index of held keys is keyed by id, so that a write fenced
-- by a lease (`WHERE id = $1 AND lease = $2 AND state = 'locked'`: a release, a heartbeat, a lease's end)
-- finds its row in one lookup whichever index the planner picks. SQLite's version 10 changes nothing.
--
-- Keyed by connector, the index was a candidate for those writes too (their `state = 'locked'` implies its
-- predicate), and one the planner preferred to the primary key whenever the statistics said few keys were
-- held (the last ANALYZE ran while the pool was idle, as after a sync): each such write then walked every
-- held key, with no condition on the index, and filtered by id. Measured with 10,000 keys, 2,000 of them
-- held and statistics from before: about 350 buffers and 0.4 to 0.8 ms per release instead of 20 buffers
-- and 0.1 ms, until autovacuum analyzed the table again. Its readers (the reaper's and `status`'s reads of
-- held keys) read every held key of one connector or of all: keyed by id, they walk it whole, as they did.
DROP INDEX keys_held;
CREATE INDEX keys_held ON keys (id) WHERE state = 'locked';
