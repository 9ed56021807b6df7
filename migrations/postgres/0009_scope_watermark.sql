-- apijongler schema, version 9 (PostgreSQL): each key's scope watermark, so that the claim and the release
-- of a key whose scopes carry no lockdown and no learned limit read neither table (README "Several
-- hosts"). SQLite's version 9 changes nothing: its claims are not spread over several relations' costs.
--
-- `keys.scope_watermark` is NULL only while no row of `lockdowns` (of any model, in force or ended) and
-- none of `learned_limits` is on one of the key's scopes (its quota scope, or `key:NAME`); otherwise it is
-- the deadline of a row that was on them (recomputed: the latest one). A claim takes a key whose watermark
-- is NULL without reading either table, and reads them for any other; a release of such a key frees it
-- without reading them.
--
-- Kept by the database itself, whoever writes:
-- - a row written to `lockdowns` or `learned_limits` marks every key of its scope whose watermark is
--   NULL, held or not, in id order (`raise_scope_watermark`);
-- - a key added, or whose group or learned project changes, gets the watermark of its new scopes
--   (`keys_rescoped`, `keys_added`);
-- - only the end of a lease lowers it, recomputed from both tables (the store's `end_in`).
-- Writers of the two tables take the advisory lock `(1095388743, hashtext(connector))` exclusively, and
-- whoever recomputes a watermark takes it shared before reading: a recomputation never misses a row
-- written at the same time. A transaction that writes either table takes the lock first, before any key
-- row, so that the trigger's updates of held keys never wait in a cycle.

ALTER TABLE keys ADD COLUMN scope_watermark BIGINT;

-- The watermark of a key of connector `c`, quota scope `s` and name `n`, read after the advisory lock
-- (shared): a volatile function's statements each read a snapshot taken when they start.
CREATE FUNCTION scope_watermark(c TEXT, s TEXT, n TEXT) RETURNS BIGINT
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1095388743, hashtext(c));
    RETURN (SELECT max(u) FROM (
        SELECT q.until AS u FROM lockdowns q WHERE q.connector = c AND q.scope IN (s, 'key:' || n)
        UNION ALL
        SELECT l.until FROM learned_limits l WHERE l.connector = c AND l.quota_scope IN (s, 'key:' || n)
    ) rows_on_scopes);
END $$;

-- After a row of `lockdowns` (scope column `scope`) or `learned_limits` (`quota_scope`) is written: the
-- keys on its scope not marked yet, held or not, marked with its deadline, locked in id order (as every
-- statement that locks several keys does). The scope column's name is the trigger's argument.
CREATE FUNCTION raise_scope_watermark() RETURNS TRIGGER
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
DECLARE
    scope TEXT := to_jsonb(NEW) ->> TG_ARGV[0];
BEGIN
    PERFORM pg_advisory_xact_lock(1095388743, hashtext(NEW.connector));
    UPDATE keys SET scope_watermark = NEW.until
     WHERE id IN (SELECT k.id FROM keys k
                   WHERE k.connector = NEW.connector
                     AND (k.quota_scope = scope OR (scope LIKE 'key:%' AND k.key_name = substr(scope, 5)))
                     AND k.scope_watermark IS NULL
                   ORDER BY k.id FOR UPDATE)
       AND scope_watermark IS NULL;
    RETURN NULL;
END $$;

CREATE TRIGGER lockdowns_raise_scope_watermark AFTER INSERT OR UPDATE ON lockdowns
    FOR EACH ROW EXECUTE FUNCTION raise_scope_watermark('scope');
CREATE TRIGGER learned_limits_raise_scope_watermark AFTER INSERT OR UPDATE ON learned_limits
    FOR EACH ROW EXECUTE FUNCTION raise_scope_watermark('quota_scope');

-- After keys are added, or a key's group or learned project changes: their watermarks from their scopes.
CREATE FUNCTION rescope_watermark() RETURNS TRIGGER
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        UPDATE keys k SET scope_watermark = scope_watermark(k.connector, k.quota_scope, k.key_name)
          FROM added WHERE k.id = added.id;
    ELSE
        UPDATE keys k SET scope_watermark = scope_watermark(k.connector, k.quota_scope, k.key_name)
         WHERE k.id = NEW.id;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER keys_added AFTER INSERT ON keys REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION rescope_watermark();
CREATE TRIGGER keys_rescoped AFTER UPDATE OF quota_group, project_learned ON keys
    FOR EACH ROW EXECUTE FUNCTION rescope_watermark();

UPDATE keys k SET scope_watermark = scope_watermark(k.connector, k.quota_scope, k.key_name);
