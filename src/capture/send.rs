//! Broadcast from the database (`docs/protocol.md`, "Broadcast from the
//! database"): a send joins the transaction's buffer, so it goes out at
//! commit, in commit order with the transaction's row changes (its row
//! events first), and never on rollback or from a rolled-back savepoint.
//! No row is kept. The SQL surface is `src/api/broadcast.rs`.
//!
//! As on Supabase, whoever may send to a topic is whoever may insert its
//! message into `realtime.messages` (privileges, and row-level security
//! policies with `realtime.topic()` set: probed by an insert in a
//! subtransaction that is rolled back, only for roles the policies apply
//! to), and a bad argument is a WARNING, never an aborted transaction.

use super::txn::{self, TXN};
use bgworker::server::protocol::TOPIC_PREFIX;
use bgworker::server::PAYLOAD_SLACK;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// What a broadcast carries.
pub enum Body<'a> {
    /// A payload's JSON text as `jsonb_out` wrote it (exact numbers), and
    /// whether it is an object without `id`, which gets one.
    Json {
        text: Option<&'a str>,
        add_id: bool,
    },
    Binary(Option<&'a [u8]>),
}

/// What was wrong, for the WARNING.
type Refusal = String;

/// Sends, or says why not with a WARNING (Supabase's words, so that what
/// watches for them still does).
pub fn send_or_warn(topic: Option<&str>, event: Option<&str>, private: Option<bool>, body: Body<'_>) {
    if let Err(why) = enqueue(topic, event, private, body) {
        warning!("WarnSendingBroadcastMessage: {why}");
    }
}

fn enqueue(topic: Option<&str>, event: Option<&str>, private: Option<bool>, body: Body<'_>) -> Result<(), Refusal> {
    let topic = topic.filter(|t| !t.is_empty()).ok_or("the topic is empty")?;
    let event = event.ok_or("the event is null")?;
    let private = private.ok_or("private is null")?;
    ready_to_send()?;
    let id = uuid::Uuid::new_v4().to_string();
    let (binary, bytes) = match body {
        Body::Json { text, add_id } => (false, json_with_id(text, add_id, &id)?),
        Body::Binary(payload) => {
            // (kind 4 holds names of up to 255 bytes, and bytes have no other form)
            if TOPIC_PREFIX.len() + topic.len() > 255 || event.len() > 255 {
                return Err("a binary broadcast's topic and event may have at most 255 bytes each".into());
            }
            (true, payload.unwrap_or_default().to_vec())
        }
    };
    let max = crate::gucs::max_payload_bytes();
    if bytes.len() > max + PAYLOAD_SLACK {
        return Err(format!(
            "the payload is {} bytes, more than pg_realtime.max_payload_size ({max} bytes)",
            bytes.len()
        ));
    }
    let json = (!binary).then(|| String::from_utf8_lossy(&bytes));
    may_send(topic, event, private, json.as_deref())?;
    // A commit record, whose LSN orders the broadcast among commits, even
    // for a transaction that writes nothing else.
    // SAFETY: inside a transaction, not in parallel mode (the functions are
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

/// The payload's text with `"id"` put first in an object that has none;
/// NULL is an object with the id alone. Checked to be JSON the worker can
/// take as it is.
fn json_with_id(text: Option<&str>, add_id: bool, id: &str) -> Result<Vec<u8>, Refusal> {
    let with_id = match text {
        None => format!(r#"{{"id": "{id}"}}"#),
        Some(t) if add_id && t.starts_with('{') => match t[1..].trim_start() {
            "}" => format!(r#"{{"id": "{id}"}}"#),
            rest => format!(r#"{{"id": "{id}", {rest}"#),
        },
        Some(t) => t.to_owned(),
    };
    // (the worker takes it with the same check: what passes here is never
    // dropped there)
    serde_json::from_str::<&serde_json::value::RawValue>(&with_id)
        .map_err(|e| format!("the payload cannot be sent as it is: {e}"))?;
    Ok(with_id.into_bytes())
}

/// Whether this session can send at all: the worker runs, serves this
/// database, and this is not a standby.
fn ready_to_send() -> Result<(), Refusal> {
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

const REFUSED: &str = "permission denied: the current role may not insert this message into realtime.messages";

/// Whether the current user may insert this message into
/// `realtime.messages`: its INSERT privilege, then, when row-level security
/// applies to it, the policies, probed by an INSERT that is rolled back (a
/// subtransaction per send, as Supabase pays an insert per send).
fn may_send(topic: &str, event: &str, private: bool, payload: Option<&str>) -> Result<(), Refusal> {
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
    probe_insert(topic, event, private, payload)
}

/// The policies' answer: an INSERT as the current user, rolled back. Only
/// `insufficient_privilege` is a no; another error is said as it is, and
/// a cancel (a statement timeout) is raised again.
fn probe_insert(topic: &str, event: &str, private: bool, payload: Option<&str>) -> Result<(), Refusal> {
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
        Err(caught) if caught.cancelled => {
            ErrorReport::new(PgSqlErrorCode::ERRCODE_QUERY_CANCELED, caught.message, "realtime.send")
                .report(PgLogLevel::ERROR);
            unreachable!("an ERROR does not return")
        }
        Err(caught) if caught.refused => Err(REFUSED.into()),
        // (a policy that failed, a lock timeout: said as it is)
        Err(caught) => Err(format!("the policy check failed: {}", caught.message)),
        Ok(Err(e)) => Err(format!("the policy check failed: {e}")),
    }
}
