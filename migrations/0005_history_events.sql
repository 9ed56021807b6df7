-- apijongler schema, version 5: every history row names its event, one typed word (see src/pool/event.rs
-- and the README's table), so that readers ask "was this a reap?" of a word rather than of a reason's prose.
--
-- The library always writes the event; the default only keeps a hand-written INSERT (an old script, the
-- sqlite3 shell) working, and marks its row as one nobody classified. There is no CHECK on the words, so
-- that a later event needs no rebuild of this (large, append-only) table: the library refuses a word it
-- does not know when it reads the row.
ALTER TABLE history ADD COLUMN event TEXT NOT NULL DEFAULT 'unclassified';

-- The rows written before this migration get the event their states and reason show. Each reason below is
-- the fixed text (or prefix) every earlier version wrote for that change; a lockdown's or error's reason
-- is the upstream answer's prose, so those are told apart by their states. Rows that match nothing (e.g.
-- the bench's raw reference rows, reason 'reference') keep 'unclassified'. Order matters: the first match
-- wins.
UPDATE history SET event = CASE
    WHEN to_state = 'locked'                                                 THEN 'claimed'
    WHEN from_state IS NULL                                                  THEN 'added'
    WHEN to_state = 'retired'                                                THEN 'retired'
    WHEN from_state = 'retired'                                              THEN 'restored'
    WHEN reason = 'secret changed in the keyring'                            THEN 'secret_changed'
    WHEN from_state = to_state AND reason LIKE 'quota group %'               THEN 'group_changed'
    WHEN to_state = 'vacant' AND reason = 'cleanup'                          THEN 'cleaned_up'
    WHEN from_state = 'locked' AND reason = 'released'                       THEN 'released'
    WHEN from_state = 'locked' AND reason LIKE 'reaped: %(stale after %'     THEN 'reaped_stale'
    WHEN from_state = 'locked' AND reason LIKE 'reaped: %'                   THEN 'reaped_dead'
    WHEN from_state = 'locked' AND reason LIKE 'cleanup --force took it from %' THEN 'force_evicted'
    WHEN from_state = 'locked' AND to_state = 'error'                        THEN 'errored'
    WHEN from_state = 'locked' AND lockdown_until IS NOT NULL                THEN 'locked_down'
    WHEN from_state IN ('vacant', 'lockdown') AND to_state = 'lockdown'
         AND reason LIKE '% locked down for every model by %'               THEN 'scope_locked_down'
    ELSE 'unclassified'
END;
