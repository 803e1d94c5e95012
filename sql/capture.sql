-- Which tables are captured: every table of the publication named by
-- pg_realtime.publication, each with one AFTER ROW trigger for the actions the
-- publication publishes. Kept in sync by event triggers on the DDL that can
-- change the set (publications, new tables, ALTER TABLE), and once at
-- CREATE EXTENSION for a publication that existed before.

-- The wanted triggers: AFTER ROW (tgtype bit 1) plus INSERT (4), DELETE (8),
-- UPDATE (16), per the publication's flags.
CREATE FUNCTION realtime.wanted_captures()
RETURNS TABLE (relid oid, tgtype int, events text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT DISTINCT ON (c.oid) c.oid,
         1 | CASE WHEN p.pubinsert THEN 4 ELSE 0 END | CASE WHEN p.pubdelete THEN 8 ELSE 0 END
           | CASE WHEN p.pubupdate THEN 16 ELSE 0 END,
         concat_ws(' OR ', CASE WHEN p.pubinsert THEN 'INSERT' END, CASE WHEN p.pubupdate THEN 'UPDATE' END,
                   CASE WHEN p.pubdelete THEN 'DELETE' END)
  FROM pg_publication p
  JOIN pg_publication_tables pt ON pt.pubname = p.pubname
  JOIN pg_namespace n ON n.nspname = pt.schemaname
  JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
  WHERE p.pubname = coalesce(nullif(current_setting('pg_realtime.publication', true), ''), 'supabase_realtime')
    AND c.relkind IN ('r', 'p')
    AND n.nspname <> 'realtime'  -- the extension's own tables (realtime.messages)
    AND (p.pubinsert OR p.pubupdate OR p.pubdelete)
$$;

-- The tables whose TRUNCATE is reported: every captured table, and each
-- partition of a captured partitioned table (a partition truncated on its
-- own fires only its own statement triggers).
CREATE FUNCTION realtime.wanted_truncates()
RETURNS TABLE (relid oid)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT w.relid FROM realtime.wanted_captures() w
  UNION
  -- (pg_partition_tree lists nothing for a table that is not partitioned)
  SELECT t.relid
  FROM realtime.wanted_captures() w
  CROSS JOIN LATERAL pg_partition_tree(w.relid) t
  JOIN pg_class c ON c.oid = t.relid
  WHERE c.relkind IN ('r', 'p')
$$;

CREATE FUNCTION realtime.sync_captured_tables() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  capture oid := 'realtime.capture_changes()'::regprocedure;
  truncate_fn oid := 'realtime.capture_truncate()'::regprocedure;
  r record;
BEGIN
  -- The ALTER TABLE below fires the event trigger that runs this function
  -- (realtime.on_ddl): told to skip, it does not recurse once per table.
  -- (A superuser-only setting, local to the transaction: no other role can
  -- make the sync skip, and an error undoes it.)
  PERFORM set_config('pg_realtime.syncing', 'on', true);
  -- Remove triggers no longer wanted, or wanted for other actions (not
  -- the clones of a partitioned table's trigger on its partitions: they
  -- come and go with it).
  FOR r IN
    SELECT t.tgrelid, t.tgname FROM pg_trigger t
    LEFT JOIN realtime.wanted_captures() w ON w.relid = t.tgrelid
    WHERE t.tgfoid = capture AND t.tgparentid = 0 AND (w.relid IS NULL OR w.tgtype <> t.tgtype)
  LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.tgrelid::regclass);
  END LOOP;

  -- Add the missing ones.
  FOR r IN
    SELECT w.relid, w.events FROM realtime.wanted_captures() w
    WHERE NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = w.relid AND t.tgfoid = capture)
  LOOP
    -- No WHEN clause: Postgres prepares a trigger's WHEN clause once per
    -- statement, which costs one-row statements more (measured with
    -- bench/run.sh) than the trigger function's own early return.
    EXECUTE format('CREATE TRIGGER pg_realtime_capture AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION realtime.capture_changes()',
                   r.events, r.relid::regclass);
  END LOOP;

  -- The same for the TRUNCATE triggers (never switched off: they cost
  -- nothing per row).
  FOR r IN
    SELECT t.tgrelid, t.tgname FROM pg_trigger t
    WHERE t.tgfoid = truncate_fn AND t.tgrelid NOT IN (SELECT w.relid FROM realtime.wanted_truncates() w)
  LOOP
    EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.tgrelid::regclass);
  END LOOP;
  FOR r IN
    SELECT w.relid FROM realtime.wanted_truncates() w
    WHERE NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = w.relid AND t.tgfoid = truncate_fn)
  LOOP
    EXECUTE format('CREATE TRIGGER pg_realtime_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION realtime.capture_truncate()',
                   r.relid::regclass);
  END LOOP;

  -- ALWAYS: rows applied by logical replication (session_replication_role
  -- = replica) are captured too, so a subscriber database serves what its
  -- publisher sends. Every trigger created above, and any left firing for
  -- origin or replica sessions only (an older install; a partition's clone
  -- of its parent's trigger). 'D' is the worker's switch: left alone.
  FOR r IN
    SELECT t.tgrelid, t.tgname FROM pg_trigger t
    WHERE t.tgfoid IN (capture, truncate_fn) AND t.tgenabled IN ('O', 'R')
  LOOP
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', r.tgrelid::regclass, r.tgname);
  END LOOP;
  PERFORM set_config('pg_realtime.syncing', 'off', true);
  PERFORM realtime.captures_changed();
END
$$;

COMMENT ON FUNCTION realtime.sync_captured_tables() IS
  'Attaches the pg_realtime capture trigger to exactly the tables of the publication named by pg_realtime.publication. Run automatically by event triggers.';

CREATE FUNCTION realtime.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF realtime.syncing() THEN
    RETURN;  -- DDL the sync itself runs
  END IF;
  PERFORM realtime.sync_captured_tables();
END
$$;

CREATE EVENT TRIGGER pg_realtime_sync ON ddl_command_end
  WHEN TAG IN ('CREATE PUBLICATION', 'ALTER PUBLICATION', 'DROP PUBLICATION',
               'CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE', 'ALTER SCHEMA')
  EXECUTE FUNCTION realtime.on_ddl();

CREATE VIEW realtime.captured_tables AS
SELECT n.nspname AS schema,
       c.relname AS "table",
       c.oid::regclass AS relation,
       (t.tgtype & 4) <> 0 AS inserts,
       (t.tgtype & 16) <> 0 AS updates,
       (t.tgtype & 8) <> 0 AS deletes,
       t.tgenabled <> 'D' AS active
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.tgfoid = 'realtime.capture_changes()'::regprocedure;

COMMENT ON VIEW realtime.captured_tables IS
  'Tables whose committed changes pg_realtime captures, and for which actions; active is false while the trigger is switched off because nobody has subscribed for pg_realtime.capture_idle_timeout.';

-- Switches the capture trigger of a table (and of its partitions) on or
-- off, for the realtime worker. The table's lock is taken only if no
-- transaction holds a conflicting one (wait_ms = 0), or within wait_ms:
-- false when it was not available. Holding it, no transaction that wrote
-- the table under the old setting is still running.
-- The ALTER TABLE fires the publication sync, which may create or drop
-- triggers on other tables: those locks are waited for 10 ms at most, so
-- no writer queues behind the worker for longer.
CREATE FUNCTION realtime.switch_capture(relid oid, fire boolean, wait_ms int DEFAULT 0) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET lock_timeout = '10ms' AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = relid) THEN
    RETURN true;  -- dropped meanwhile: nothing to switch
  END IF;
  IF wait_ms > 0 THEN
    PERFORM set_config('lock_timeout', wait_ms::text, true);
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', relid::regclass);
  ELSE
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE NOWAIT', relid::regclass);
  END IF;
  IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = relid AND tgname = 'pg_realtime_capture'
             AND tgfoid = 'realtime.capture_changes()'::regprocedure) THEN
    EXECUTE format('ALTER TABLE %s %s TRIGGER pg_realtime_capture', relid::regclass,
                   CASE WHEN fire THEN 'ENABLE ALWAYS' ELSE 'DISABLE' END);
  END IF;
  RETURN true;
EXCEPTION WHEN lock_not_available THEN
  RETURN false;
END
$$;

SELECT realtime.sync_captured_tables();

-- Schema realtime is usable by every role (private channels' policies call
-- realtime.topic()); the capture machinery is for superusers only: nobody
-- else may attach the capture trigger to a table (EXECUTE is checked when
-- a trigger is created, not when it fires), ask what is subscribed to, or
-- read the counters (pg_monitor may).
REVOKE EXECUTE ON FUNCTION realtime.sync_captured_tables() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION realtime.wanted_captures() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION realtime.wanted_truncates() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION realtime.switch_capture(oid, boolean, int) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION realtime.captures_changed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION realtime.syncing() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION realtime.capture_changes() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION realtime.capture_truncate() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION realtime.interested(oid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION realtime.stats() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION realtime.stats() TO pg_monitor;
