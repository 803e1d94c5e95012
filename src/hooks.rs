//! The log hook that keeps secret settings out of the server log (see
//! `bgworker::shared::redact`). It runs in every process that loaded the library,
//! the postmaster included, which is where reloads are logged.

use pgrx::prelude::*;
use std::ffi::{c_char, CStr};

static mut PREV_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

/// Installs the hook; called from `_PG_init`.
pub fn install() {
    // SAFETY: _PG_init runs single-threaded in the loading process; hooks
    // are chained the way Postgres modules do it.
    unsafe {
        PREV_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(redact_secrets);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn redact_secrets(edata: *mut pg_sys::ErrorData) {
    // SAFETY: Postgres passes a valid ErrorData whose strings it allocated
    // and owns until the report is done; cutting one short in place neither
    // allocates nor can fail, which matters inside error reporting.
    unsafe {
        if let Some(edata) = edata.as_mut() {
            for field in [
                edata.message,
                edata.detail,
                edata.detail_log,
                edata.context,
                edata.internalquery,
            ] {
                cut(field);
            }
            let query = pg_sys::debug_query_string;
            if !query.is_null() && bgworker::shared::redact::cut_point(CStr::from_ptr(query).to_bytes()).is_some() {
                // the STATEMENT: line would repeat the secret
                edata.hide_stmt = true;
            }
        }
        if let Some(prev) = PREV_EMIT_LOG_HOOK {
            prev(edata);
        }
    }
}

/// Ends a NUL-terminated string right after a secret setting's name.
///
/// # Safety
/// `text` is null or a valid, writable NUL-terminated string.
unsafe fn cut(text: *mut c_char) {
    if text.is_null() {
        return;
    }
    // SAFETY: per this function's contract.
    unsafe {
        if let Some(at) = bgworker::shared::redact::cut_point(CStr::from_ptr(text).to_bytes()) {
            *text.add(at) = 0;
        }
    }
}
