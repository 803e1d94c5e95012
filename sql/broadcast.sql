-- Broadcast from the database, with Supabase's signatures (README,
-- "Broadcast from the database"). Sent at commit, in commit order; a bad
-- argument is a WARNING and nothing is sent.

-- (operators schema-qualified: a caller's search_path cannot swap them)
-- payload gets an "id" (the message's, also meta.id) when it is an object
-- without one; its text is jsonb's own, so numbers go out exactly.
CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
RETURNS void LANGUAGE sql VOLATILE AS $$
  SELECT realtime.send_json(
    payload::pg_catalog.text,
    pg_catalog.jsonb_typeof(payload) OPERATOR(pg_catalog.=) 'object'
      AND NOT payload OPERATOR(pg_catalog.?) 'id',
    event, topic, private)
$$;

-- The row change as a broadcast to a private topic:
-- {old_record, record, operation, table, schema} (plus id).
CREATE FUNCTION realtime.broadcast_changes(
  topic_name text, event_name text, operation text, table_name text,
  table_schema text, new record, old record, level text DEFAULT 'ROW'
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF level OPERATOR(pg_catalog.=) 'STATEMENT' THEN
    RAISE EXCEPTION 'function can only be triggered for each row, not for each statement';
  END IF;
  IF NOT operation OPERATOR(pg_catalog.=) ANY (ARRAY['INSERT', 'UPDATE', 'DELETE']) THEN
    RAISE EXCEPTION 'Unexpected operation type: %', operation;
  END IF;
  PERFORM realtime.send(
    pg_catalog.jsonb_build_object(
      'old_record', old, 'record', new, 'operation', operation,
      'table', table_name, 'schema', table_schema),
    event_name, topic_name, true);
END;
$$;
