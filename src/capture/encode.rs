//! Encoding a captured row: the whole tuple through `row_to_json`, called as
//! a C function (typed JSON: numbers, booleans, nested json, arrays, ISO
//! timestamps; TOASTed values detoasted by the output functions), and a
//! description of its relation for the worker.

use pgrx::prelude::*;
use realtime::changes::wire::{Column, Relation};
use std::ffi::CStr;

/// The row as a JSON object, as text.
///
/// # Safety
/// `tuple` is a valid heap tuple of the relation described by `desc`.
pub unsafe fn row_json(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) -> String {
    // SAFETY: per the contract; row_to_json reads the composite datum with
    // the relation's row type, and its result is a palloc'd text in the
    // current (trigger call) memory context.
    unsafe {
        let composite = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        let json = pg_sys::OidFunctionCall1Coll(
            pg_sys::Oid::from(pg_sys::F_ROW_TO_JSON_RECORD),
            pg_sys::InvalidOid,
            composite,
        );
        let text = pg_sys::text_to_cstring(json.cast_mut_ptr());
        let out = CStr::from_ptr(text).to_string_lossy().into_owned();
        pg_sys::pfree(text.cast());
        out
    }
}

/// Names, column names and types, and replica identity of a relation.
///
/// # Safety
/// `rel` is an open relation.
pub unsafe fn describe(rel: pg_sys::Relation) -> Relation {
    // SAFETY: per the contract; catalog look-ups by valid OIDs.
    unsafe {
        let form = &*(*rel).rd_rel;
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let attrs = (*desc).attrs.as_slice(natts);
        let mut columns = Vec::with_capacity(natts);
        // attnum of each kept column, for the identity positions
        let mut attnums = Vec::with_capacity(natts);
        for att in attrs.iter().filter(|a| !a.attisdropped) {
            columns.push(Column {
                name: att.name().to_owned(),
                typname: typname(att.atttypid),
            });
            attnums.push(att.attnum as i32);
        }
        let identity: Vec<u16> = if form.relreplident == pg_sys::REPLICA_IDENTITY_FULL as std::ffi::c_char {
            (0..columns.len() as u16).collect()
        } else {
            let keys =
                pg_sys::RelationGetIndexAttrBitmap(rel, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY);
            let mut identity = Vec::new();
            let mut member = -1;
            loop {
                member = pg_sys::bms_next_member(keys, member);
                if member < 0 {
                    break;
                }
                let attnum = member + pg_sys::FirstLowInvalidHeapAttributeNumber;
                if let Some(pos) = attnums.iter().position(|a| *a == attnum) {
                    identity.push(pos as u16);
                }
            }
            identity
        };
        let schema_ptr = pg_sys::get_namespace_name(form.relnamespace);
        let schema = if schema_ptr.is_null() {
            String::new()
        } else {
            CStr::from_ptr(schema_ptr).to_string_lossy().into_owned()
        };
        Relation {
            relid: (*rel).rd_id.to_u32(),
            schema,
            table: pgrx::name_data_to_str(&form.relname).to_owned(),
            columns,
            identity,
        }
    }
}

/// `pg_type.typname` of a type (`int4`, `_text`, `timestamptz`).
fn typname(oid: pg_sys::Oid) -> String {
    // SAFETY: a syscache look-up and release; the name is copied out first.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::TYPEOID as _, pg_sys::Datum::from(oid));
        if tuple.is_null() {
            return format!("{}", oid.to_u32());
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_type>(tuple);
        let name = pgrx::name_data_to_str(&(*form).typname).to_owned();
        pg_sys::ReleaseSysCache(tuple);
        name
    }
}
