//! Encoding a captured row as JSON, column by column with an encoder chosen
//! once per relation (typed values as `row_to_json` writes them: numbers,
//! booleans, nested json, arrays, ISO timestamps; TOASTed values
//! detoasted), and a description of its relation for the worker.

use bgworker::shared::json::{escape_into, push_datetime, push_int, DateTimeKind};
use bgworker::shared::wire::{Column, Relation};
use pgrx::prelude::*;
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
    /// The column's name, and `"name":` escaped once.
    pub name: String,
    key: Vec<u8>,
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
            let mut key = Vec::with_capacity(att.name().len() + 3);
            escape_into(&mut key, att.name().as_bytes());
            key.push(b':');
            out.push(ColumnEncoder {
                index,
                name: att.name().to_owned(),
                key,
                category,
                typid: base,
                output,
            });
        }
        out
    }
}

/// Appends the row to `out` as a JSON object: typed values as
/// `row_to_json` would write them (but timestamptz in UTC, bytea as bare
/// hex), TOASTed values detoasted. `at` gets where each column's value
/// starts in the object, in the order of `columns`. The tuple is deformed
/// into `deformed`, buffers the caller keeps from row to row.
///
/// # Safety
/// `tuple` is a valid heap tuple of the relation described by `desc`, and
/// `columns` were made by [`encoders`] for that descriptor.
pub unsafe fn row_json(
    out: &mut Vec<u8>,
    at: &mut Vec<u32>,
    deformed: &mut Deformed,
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    columns: &[ColumnEncoder],
) {
    // SAFETY: per the contract.
    unsafe {
        deform(deformed, tuple, desc);
        deformed_json(out, at, deformed, columns);
    }
}

/// Deforms a tuple into `deformed`.
///
/// # Safety
/// `tuple` is a valid heap tuple of the relation described by `desc`.
pub unsafe fn deform(deformed: &mut Deformed, tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) {
    // SAFETY: per the contract; the vectors are sized to the descriptor.
    unsafe {
        let natts = (*desc).natts as usize;
        let Deformed { values, nulls } = deformed;
        values.clear();
        values.resize(natts, pg_sys::Datum::from(0usize));
        nulls.clear();
        nulls.resize(natts, true);
        crate::unguarded::deform_tuple(tuple, desc, values, nulls);
    }
}

/// A deformed tuple's values and null flags (scratch).
#[derive(Default)]
pub struct Deformed {
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
}

/// [`row_json`] of a row [`deform`]ed already.
///
/// # Safety
/// `deformed` holds a tuple of the descriptor `columns` were made for.
pub unsafe fn deformed_json(out: &mut Vec<u8>, at: &mut Vec<u32>, deformed: &Deformed, columns: &[ColumnEncoder]) {
    // SAFETY: per the contract.
    unsafe {
        out.reserve(64 + 24 * columns.len());
        at.clear();
        let start = out.len();
        out.push(b'{');
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&column.key);
            at.push((out.len() - start) as u32);
            value_json(out, deformed, column);
        }
        out.push(b'}');
    }
}

/// Appends the JSON value of one column of a deformed row (as
/// [`row_json`] writes it there).
///
/// # Safety
/// As for [`deformed_json`].
pub unsafe fn value_json(out: &mut Vec<u8>, deformed: &Deformed, column: &ColumnEncoder) {
    // SAFETY: per the contract; results of output functions are palloc'd
    // in the trigger call's memory context and copied out at once.
    unsafe {
        if deformed.nulls[column.index] {
            out.extend_from_slice(b"null");
            return;
        }
        let datum = deformed.values[column.index];
        match column.category {
            Category::Int2 => push_int(out, i64::from(datum.value() as i16)),
            Category::Int4 => push_int(out, i64::from(datum.value() as i32)),
            Category::Int8 => push_int(out, datum.value() as i64),
            Category::Bool => out.extend_from_slice(if datum.value() != 0 { b"true" } else { b"false" }),
            Category::Number => {
                let text = output_text(column.output, datum);
                let numeric =
                    text.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'-') && !text.ends_with("Infinity");
                if numeric {
                    out.extend_from_slice(text.as_bytes());
                } else {
                    escape_into(out, text.as_bytes());
                }
            }
            Category::Json => out.extend_from_slice(output_text(column.output, datum).as_bytes()),
            Category::Text => escape_into(out, pgrx::varlena::varlena_to_byte_slice(detoasted(datum))),
            Category::Bytea => {
                let bytes = pgrx::varlena::varlena_to_byte_slice(detoasted(datum));
                out.reserve(bytes.len() * 2 + 2);
                out.push(b'"');
                for b in bytes {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.push(HEX[(b >> 4) as usize]);
                    out.push(HEX[(b & 15) as usize]);
                }
                out.push(b'"');
            }
            Category::DateTime => push_date_time(out, column.typid, datum),
            Category::Array => out.extend_from_slice(call_json(pg_sys::F_ARRAY_TO_JSON_ANYARRAY, datum).as_bytes()),
            Category::Composite => out.extend_from_slice(call_json(pg_sys::F_ROW_TO_JSON_RECORD, datum).as_bytes()),
            Category::Other => escape_into(out, output_text(column.output, datum).as_bytes()),
        }
    }
}

/// A varlena value in a form whose bytes can be read: as it is when it is
/// stored inline and uncompressed (the usual case, with no call into
/// Postgres), else detoasted (`pg_detoast_datum_packed`, which does the
/// same test first).
///
/// # Safety
/// `datum` is a varlena value of a tuple being encoded.
unsafe fn detoasted(datum: pg_sys::Datum) -> *mut pg_sys::varlena {
    let value = datum.cast_mut_ptr::<pg_sys::varlena>();
    // SAFETY: per the contract; the header tests read the first byte(s).
    unsafe {
        if pgrx::varlena::varatt_is_1b_e(value) || pgrx::varlena::varatt_is_4b_c(value) {
            pg_sys::pg_detoast_datum_packed(value)
        } else {
            value
        }
    }
}

/// Appends a date, timestamp or timestamptz (in UTC) as Postgres's JSON
/// functions write it: by hand for the years 1 to 9999, by
/// `JsonEncodeDateTime` otherwise (infinities, BC, five-digit years).
///
/// # Safety
/// `datum` is a value of type `typid`, one of the three.
pub unsafe fn push_date_time(out: &mut Vec<u8>, typid: pg_sys::Oid, datum: pg_sys::Datum) {
    let (kind, value) = match typid {
        pg_sys::DATEOID => (DateTimeKind::Date, i64::from(datum.value() as i32)),
        pg_sys::TIMESTAMPOID => (DateTimeKind::Timestamp, datum.value() as i64),
        _ => (DateTimeKind::TimestampTzUtc, datum.value() as i64),
    };
    if push_datetime(out, kind, value) {
        return;
    }
    let utc: std::ffi::c_int = 0;
    let tz = if kind == DateTimeKind::TimestampTzUtc {
        &utc as *const _
    } else {
        std::ptr::null()
    };
    // SAFETY: per the contract; the text is palloc'd, copied, freed.
    unsafe {
        let text = pg_sys::JsonEncodeDateTime(std::ptr::null_mut(), datum, typid, tz);
        escape_into(out, CStr::from_ptr(text).to_bytes());
        pg_sys::pfree(text.cast());
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
                type_oid: att.atttypid.to_u32(),
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
