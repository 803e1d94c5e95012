-- Private channels (docs/protocol.md, "Private channels"): who may join, read and write
-- a private topic is decided by row-level security policies on
-- realtime.messages, written by the DBA, using realtime.topic() and the
-- extension column. The worker probes them as the channel's identity
-- (role, request.jwt.claims, realtime.topic) in a transaction it always
-- rolls back; no row is ever kept.

CREATE TABLE realtime.messages (
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  topic       text NOT NULL,
  extension   text NOT NULL CHECK (extension IN ('broadcast', 'presence')),
  payload     jsonb,
  event       text,
  private     boolean NOT NULL DEFAULT false,
  updated_at  timestamp NOT NULL DEFAULT now(),
  inserted_at timestamp NOT NULL DEFAULT now(),
  PRIMARY KEY (id, inserted_at)
);
ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
COMMENT ON TABLE realtime.messages IS
  'Authorization of private channels: write SELECT (read) and INSERT (write) policies using realtime.topic() and extension';

-- The topic being authorized, for policies; NULL outside a check.
CREATE FUNCTION realtime.topic() RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT nullif(pg_catalog.current_setting('realtime.topic', true), '')
$$;

-- Every role may be asked about; with no policy, nobody may do anything.
GRANT USAGE ON SCHEMA realtime TO PUBLIC;
GRANT SELECT, INSERT ON realtime.messages TO PUBLIC;
GRANT EXECUTE ON FUNCTION realtime.topic() TO PUBLIC;
