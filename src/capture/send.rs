//! Broadcast from the database (`docs/protocol.md`, "Broadcast from the
//! database"): `realtime.send` and `realtime.send_binary` add a broadcast
//! to the transaction's buffer, so it goes out at commit, in commit order
//! with the transaction's row changes, and never on rollback or from a
//! rolled-back savepoint. No row is written.
//!
//! As on Supabase, whoever may send to a topic is whoever may insert its
//! message into `realtime.messages` (privileges, and row-level security
//! policies with `realtime.topic()` set: probed in a subtransaction that is
//! rolled back, only for roles the policies apply to), and a bad argument
//! is a WARNING, never an aborted transaction.

use super::txn::{self, TXN};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;

/// Bytes a payload may have over `pg_realtime.max_payload_size`, as Supabase allows.
const PAYLOAD_SLACK: usize = 500;

/// What a broadcast carries.
enum Body<'a> {
    Json(Option<Value>),
    Binary(Option<&'a [u8]>),
}

#[pg_extern(volatile, parallel_unsafe)]
fn send(payload: Option<JsonB>, event: Option<&str>, topic: Option<&str>, private: default!(Option<bool>, true)) {
    warn_unless_sent(topic, event, private, Body::Json(payload.map(|j| j.0)));
}

#[pg_extern(volatile, parallel_unsafe)]
fn send_binary(
    payload: Option<&[u8]>,
    event: Option<&str>,
    topic: Option<&str>,
    private: default!(Option<bool>, true),
) {
    warn_unless_sent(topic, event, private, Body::Binary(payload));
}

fn warn_unless_sent(topic: Option<&str>, event: Option<&str>, private: Option<bool>, body: Body<'_>) {
    if let Err(why) = enqueue(topic, event, private, body) {
        // Supabase's words, so that what watches for them still does
        warning!("WarnSendingBroadcastMessage: {why}");
    }
}

fn enqueue(topic: Option<&str>, event: Option<&str>, private: Option<bool>, body: Body<'_>) -> Result<(), String> {
    let topic = topic.filter(|t| !t.is_empty()).ok_or("the topic is empty")?;
    let event = event.ok_or("the event is null")?;
    let private = private.ok_or("private is null")?;
    ready_to_send()?;
    let id = uuid::Uuid::new_v4().to_string();
    let (binary, bytes): (bool, Vec<u8>) = match body {
        Body::Json(payload) => (false, with_id(payload, &id).to_string().into_bytes()),
        Body::Binary(payload) => (true, payload.unwrap_or_default().to_vec()),
    };
    let max = crate::gucs::max_payload_bytes();
    if bytes.len() > max + PAYLOAD_SLACK {
        return Err(format!(
            "the payload is {} bytes, more than pg_realtime.max_payload_size ({max} bytes)",
            bytes.len()
        ));
    }
    let json = (!binary).then(|| String::from_utf8_lossy(&bytes).into_owned());
    may_send(topic, event, private, json.as_deref())?;
    // A commit record, whose LSN orders the broadcast among commits, even
    // for a transaction that writes nothing else.
    // SAFETY: inside a transaction, not in parallel mode (the function is
    // parallel unsafe), not in recovery (`ready_to_send`).
    unsafe { pg_sys::GetTopTransactionId() };
    txn::ensure_callbacks();
    let subxact = crate::unguarded::current_subtransaction();
    TXN.with(|t| {
        let mut txn = t.borrow_mut();
        txn.changes
            .broadcast(private, binary, [topic, event, &id], &bytes, subxact);
        if txn.changes.rows.len() > crate::shmem::ring().max_payload() {
            // Larger than the ring could ever hold: report the loss at commit.
            txn.changes.overflow();
        }
    });
    Ok(())
}

/// The payload with `id` added, as Supabase's `realtime.send` adds it: to
/// an object without one. NULL is an object with the id alone.
fn with_id(payload: Option<Value>, id: &str) -> Value {
    let mut payload = payload.unwrap_or_else(|| Value::Object(Default::default()));
    if let Value::Object(map) = &mut payload {
        map.entry("id").or_insert_with(|| Value::from(id));
    }
    payload
}

/// Whether this session can send at all: the worker runs, serves this
/// database, and this is not a standby.
fn ready_to_send() -> Result<(), String> {
    if !crate::preloaded() {
        return Err("pg_realtime is not running (it is not in shared_preload_libraries)".into());
    }
    // SAFETY: a plain read of the recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Err("a standby cannot broadcast; send from the primary".into());
    }
    let served = crate::gucs::database();
    // SAFETY: the name of this session's database, palloc'd in the current
    // context; read at once.
    let here = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        (!name.is_null()).then(|| std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
    };
    if here.as_deref() != Some(served.as_str()) {
        return Err(format!(
            "pg_realtime serves database \"{served}\" (pg_realtime.database), not this one"
        ));
    }
    Ok(())
}

/// Whether the current user may insert this message into
/// `realtime.messages`: its INSERT privilege, then, when row-level security
/// applies to it, the policies, probed by an INSERT that is rolled back.
fn may_send(topic: &str, event: &str, private: bool, payload: Option<&str>) -> Result<(), String> {
    const REFUSED: &str = "permission denied: the current role may not insert this message into realtime.messages";
    // SAFETY: syscache look-ups by name; InvalidOid when missing.
    let relid = unsafe {
        let namespace = pg_sys::get_namespace_oid(c"realtime".as_ptr(), true);
        pg_sys::get_relname_relid(c"messages".as_ptr(), namespace)
    };
    if relid == pg_sys::InvalidOid {
        return Err("realtime.messages is missing".into());
    }
    // SAFETY: an ACL check of an existing relation for the current user.
    let may_insert =
        unsafe { pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_INSERT as pg_sys::AclMode) }
            == pg_sys::AclResult::ACLCHECK_OK;
    if !may_insert {
        return Err(REFUSED.into());
    }
    // SAFETY: as above; with noError, never raises.
    let rls = unsafe { pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, true) };
    if rls != pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
        return Ok(());
    }
    let probe = crate::subxact::run(
        || {
            Spi::connect_mut(|client| {
                client.update(
                    "SELECT pg_catalog.set_config('realtime.topic', $1, true)",
                    None,
                    &[topic.into()],
                )?;
                client
                    .update(
                        "INSERT INTO realtime.messages (topic, extension, event, payload, private) \
                         VALUES ($1, 'broadcast', $2, $3::pg_catalog.jsonb, $4)",
                        None,
                        &[topic.into(), event.into(), payload.into(), private.into()],
                    )
                    .map(|_| ())
            })
        },
        false,
    );
    match probe {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(REFUSED.into()),
    }
}

extension_sql!(
    r#"
-- Supabase's trigger helper: the row change as a broadcast to a private
-- topic, {old_record, record, operation, table, schema} (plus id).
CREATE FUNCTION realtime.broadcast_changes(
  topic_name text, event_name text, operation text, table_name text,
  table_schema text, new record, old record, level text DEFAULT 'ROW'
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  IF level = 'STATEMENT' THEN
    RAISE EXCEPTION 'function can only be triggered for each row, not for each statement';
  END IF;
  IF operation NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
    RAISE EXCEPTION 'Unexpected operation type: %', operation;
  END IF;
  PERFORM realtime.send(
    pg_catalog.jsonb_build_object(
      'old_record', old, 'record', new, 'operation', operation,
      'table', table_name, 'schema', table_schema),
    event_name, topic_name, true);
END;
$$;
"#,
    name = "broadcast_changes",
    requires = [send],
);
