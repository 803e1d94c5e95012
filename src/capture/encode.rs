//! Encoding a captured row: the whole tuple through `row_to_json`, called as
//! a C function (typed JSON: numbers, booleans, nested json, arrays, ISO
//! timestamps; TOASTed values detoasted by the output functions), and a
//! description of its relation for the worker.

use pgrx::prelude::*;
use realtime::changes::json::{escape_into, push_int};
use realtime::changes::wire::{Column, Relation};
use std::ffi::CStr;

/// How one column is written as JSON, decided once per relation.
#[derive(Clone, Copy, Debug)]
enum Category {
    /// int2/int4/int8: formatted straight from the datum.
    Int2,
    Int4,
    Int8,
    /// float, numeric, oid: the output text, quoted when it is not a JSON
    /// number (NaN, Infinity).
    Number,
    Bool,
    /// json, jsonb: the output text is JSON already.
    Json,
    /// text, varchar, bpchar, name: the bytes, escaped.
    Text,
    /// bytea: hex, without `\x`.
    Bytea,
    /// date, timestamp, timestamptz: ISO-8601 as Postgres's JSON functions
    /// write it; timestamptz in UTC whatever the session's TimeZone.
    DateTime,
    /// arrays: `array_to_json`.
    Array,
    /// composite types: `row_to_json`.
    Composite,
    /// anything else: the output text as a JSON string.
    Other,
}

/// A column's encoder.
#[derive(Clone, Debug)]
pub struct ColumnEncoder {
    /// Position in the tuple descriptor.
    index: usize,
    /// `"name":`, escaped once.
    key: String,
    category: Category,
    /// The type (for DateTime) and its output function.
    typid: pg_sys::Oid,
    output: pg_sys::Oid,
}

/// Encoders for a relation's live columns.
pub fn encoders(desc: pg_sys::TupleDesc) -> Vec<ColumnEncoder> {
    // SAFETY: `desc` is the open relation's descriptor; catalog look-ups by
    // valid type OIDs.
    unsafe {
        let natts = (*desc).natts as usize;
        // (PgTupleDesc reads the attributes the way each major lays them out)
        let attrs = pgrx::PgTupleDesc::from_pg_unchecked(desc);
        let mut out = Vec::with_capacity(natts);
        for (index, att) in attrs.iter().enumerate().filter(|(_, a)| !a.attisdropped) {
            let base = pg_sys::getBaseType(att.atttypid);
            let category = if base == pg_sys::INT2OID {
                Category::Int2
            } else if base == pg_sys::INT4OID {
                Category::Int4
            } else if base == pg_sys::INT8OID {
                Category::Int8
            } else if [pg_sys::FLOAT4OID, pg_sys::FLOAT8OID, pg_sys::NUMERICOID, pg_sys::OIDOID].contains(&base) {
                Category::Number
            } else if base == pg_sys::BOOLOID {
                Category::Bool
            } else if base == pg_sys::JSONOID || base == pg_sys::JSONBOID {
                Category::Json
            } else if [pg_sys::TEXTOID, pg_sys::VARCHAROID, pg_sys::BPCHAROID, pg_sys::NAMEOID].contains(&base) {
                Category::Text
            } else if base == pg_sys::BYTEAOID {
                Category::Bytea
            } else if [pg_sys::DATEOID, pg_sys::TIMESTAMPOID, pg_sys::TIMESTAMPTZOID].contains(&base) {
                Category::DateTime
            } else if pg_sys::get_element_type(base) != pg_sys::InvalidOid {
                Category::Array
            } else if pg_sys::get_typtype(base) as u8 == pg_sys::TYPTYPE_COMPOSITE {
                Category::Composite
            } else {
                Category::Other
            };
            let mut output = pg_sys::InvalidOid;
            let mut varlena = false;
            pg_sys::getTypeOutputInfo(att.atttypid, &mut output, &mut varlena);
            let mut key = String::with_capacity(att.name().len() + 3);
            escape_into(&mut key, att.name().as_bytes());
            key.push(':');
            out.push(ColumnEncoder {
                index,
                key,
                category,
                typid: base,
                output,
            });
        }
        out
    }
}

/// The row as a JSON object, as text: typed values as `row_to_json` would
/// write them (but timestamptz in UTC, bytea as bare hex), TOASTed values
/// detoasted.
///
/// # Safety
/// `tuple` is a valid heap tuple of the relation described by `desc`, and
/// `columns` were made by [`encoders`] for that descriptor.
pub unsafe fn row_json(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, columns: &[ColumnEncoder]) -> String {
    // SAFETY: per the contract; results of output functions are palloc'd in
    // the trigger call's memory context and copied out at once.
    unsafe {
        let natts = (*desc).natts as usize;
        // The deformed tuple goes into buffers kept from row to row.
        let (mut values, mut nulls) = DEFORMED.take();
        values.clear();
        values.resize(natts, pg_sys::Datum::from(0usize));
        nulls.clear();
        nulls.resize(natts, true);
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let out = write_row(&values, &nulls, columns);
        DEFORMED.set((values, nulls));
        out
    }
}

thread_local! {
    static DEFORMED: std::cell::Cell<(Vec<pg_sys::Datum>, Vec<bool>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// The JSON object of a deformed row.
///
/// # Safety
/// As for [`row_json`]: `values` and `nulls` are a tuple of the descriptor
/// `columns` were made for.
unsafe fn write_row(values: &[pg_sys::Datum], nulls: &[bool], columns: &[ColumnEncoder]) -> String {
    // SAFETY: per the contract.
    unsafe {
        let mut out = String::with_capacity(64 + 24 * columns.len());
        out.push('{');
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&column.key);
            if nulls[column.index] {
                out.push_str("null");
                continue;
            }
            let datum = values[column.index];
            match column.category {
                Category::Int2 => push_int(&mut out, i64::from(datum.value() as i16)),
                Category::Int4 => push_int(&mut out, i64::from(datum.value() as i32)),
                Category::Int8 => push_int(&mut out, datum.value() as i64),
                Category::Bool => out.push_str(if datum.value() != 0 { "true" } else { "false" }),
                Category::Number => {
                    let text = output_text(column.output, datum);
                    let numeric = text.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'-')
                        && !text.ends_with("Infinity");
                    if numeric {
                        out.push_str(&text);
                    } else {
                        escape_into(&mut out, text.as_bytes());
                    }
                }
                Category::Json => out.push_str(&output_text(column.output, datum)),
                Category::Text => {
                    let detoasted = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
                    escape_into(&mut out, pgrx::varlena::varlena_to_byte_slice(detoasted));
                }
                Category::Bytea => {
                    let detoasted = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
                    let bytes = pgrx::varlena::varlena_to_byte_slice(detoasted);
                    out.reserve(bytes.len() * 2 + 2);
                    out.push('"');
                    for b in bytes {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        out.push(HEX[(b >> 4) as usize] as char);
                        out.push(HEX[(b & 15) as usize] as char);
                    }
                    out.push('"');
                }
                Category::DateTime => {
                    let utc: std::ffi::c_int = 0;
                    let tz = if column.typid == pg_sys::TIMESTAMPTZOID {
                        &utc as *const _
                    } else {
                        std::ptr::null()
                    };
                    let text = pg_sys::JsonEncodeDateTime(std::ptr::null_mut(), datum, column.typid, tz);
                    escape_into(&mut out, CStr::from_ptr(text).to_bytes());
                    pg_sys::pfree(text.cast());
                }
                Category::Array => out.push_str(&call_json(pg_sys::F_ARRAY_TO_JSON_ANYARRAY, datum)),
                Category::Composite => out.push_str(&call_json(pg_sys::F_ROW_TO_JSON_RECORD, datum)),
                Category::Other => escape_into(&mut out, output_text(column.output, datum).as_bytes()),
            }
        }
        out.push('}');
        out
    }
}

/// A type's output function applied to a datum, as a Rust string.
unsafe fn output_text(function: pg_sys::Oid, datum: pg_sys::Datum) -> String {
    // SAFETY: `function` is the datum's type output function.
    unsafe {
        let text = pg_sys::OidOutputFunctionCall(function, datum);
        let out = CStr::from_ptr(text).to_string_lossy().into_owned();
        pg_sys::pfree(text.cast());
        out
    }
}

/// A built-in `... -> json` function applied to a datum, as text.
unsafe fn call_json(function: u32, datum: pg_sys::Datum) -> String {
    // SAFETY: `function` takes the datum's type and returns json (text).
    unsafe {
        let json = pg_sys::OidFunctionCall1Coll(pg_sys::Oid::from(function), pg_sys::InvalidOid, datum);
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
        let attrs = pgrx::PgTupleDesc::from_pg_unchecked(desc);
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
        // Positions (among the kept columns) of an index-attribute bitmap.
        let positions = |kind: pg_sys::IndexAttrBitmapKind::Type| {
            let keys = pg_sys::RelationGetIndexAttrBitmap(rel, kind);
            let mut out = Vec::new();
            let mut member = -1;
            loop {
                member = pg_sys::bms_next_member(keys, member);
                if member < 0 {
                    break;
                }
                let attnum = member + pg_sys::FirstLowInvalidHeapAttributeNumber;
                if let Some(pos) = attnums.iter().position(|a| *a == attnum) {
                    out.push(pos as u16);
                }
            }
            out
        };
        let identity: Vec<u16> = if form.relreplident == pg_sys::REPLICA_IDENTITY_FULL as std::ffi::c_char {
            (0..columns.len() as u16).collect()
        } else {
            positions(pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY)
        };
        let primary_key = positions(pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY);
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
            primary_key,
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
