//! What a backend caches about the relations its trigger fires on: each
//! one's description and row encoders, and a partition's root, kept until
//! the relcache says the relation changed.

use super::encode;
use bgworker::shared::keys::Kind;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// A relation's description (encoded as records carry it, once) and row
/// encoder, cached per backend.
#[derive(Clone)]
pub(super) struct Described {
    pub(super) relation: Rc<[u8]>,
    pub(super) encoders: Rc<Vec<encode::ColumnEncoder>>,
    pub(super) order: Order,
    /// The column a key filter slot names, as last read.
    probe: Rc<Cell<Option<Probe>>>,
}

/// Which of a relation's columns a key filter slot filters on
/// (`bgworker::shared::prefilter`), as read from the slot at `generation`.
#[derive(Clone, Copy)]
pub(super) struct Probe {
    pub(super) slot: usize,
    pub(super) generation: u64,
    /// The encoder that writes the column (None: the relation has no
    /// column of that name, so its rows all go on).
    encoder: Option<usize>,
    pub(super) kind: Kind,
}

/// How the encoders' columns map onto the reported relation's, for the
/// value offsets each row carries (`wire::put_offsets`).
#[derive(Clone)]
pub(super) enum Order {
    /// The same columns in the same order.
    Same,
    /// A partition whose columns are in another order than its root's: for
    /// each of the root's columns, the encoder that writes it.
    Permuted(Rc<[usize]>),
    /// Some reported column has no encoder: rows carry no offsets.
    Unknown,
}

impl Order {
    fn of(relation: &bgworker::shared::wire::Relation, encoders: &[encode::ColumnEncoder]) -> Order {
        let positions: Option<Vec<usize>> = relation
            .columns
            .iter()
            .map(|c| encoders.iter().position(|e| e.name == c.name))
            .collect();
        match positions {
            Some(p) if p.len() == encoders.len() && p.iter().enumerate().all(|(i, j)| i == *j) => Order::Same,
            Some(p) => Order::Permuted(p.into()),
            None => Order::Unknown,
        }
    }
}

/// Hashes an OID for the per-backend caches with one multiplication: the
/// default SipHash costs more than the rest of a look-up, and OIDs are not
/// chosen by an adversary.
#[derive(Default)]
struct OidHasher(u64);

impl std::hash::Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type OidMap<V> = HashMap<u32, V, std::hash::BuildHasherDefault<OidHasher>>;

// A backend is single-threaded: these are per-backend caches.
thread_local! {
    /// Relation descriptions, kept across transactions until the relcache
    /// says the relation changed.
    static DESCRIBED: RefCell<OidMap<Described>> = RefCell::new(OidMap::default());
    /// A partition's root partitioned table and the root's schema, by
    /// partition OID, until the relcache says the partition changed
    /// (ATTACH and DETACH PARTITION do).
    static ROOTS: RefCell<OidMap<(pg_sys::Oid, pg_sys::Oid)>> = RefCell::new(OidMap::default());
}

// Not in pgrx's bindings (catalog/partition.h); this signature is the one of
// PostgreSQL 14 and later. Called through `parent_of` only.
unsafe extern "C-unwind" {
    fn get_partition_parent(relid: pg_sys::Oid, even_if_detached: bool) -> pg_sys::Oid;
}

/// The parent of a partition.
///
/// # Safety
/// Main thread of a backend; `relid` is an attached partition.
unsafe fn parent_of(relid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: per the contract; the guard turns an ERROR raised inside into
    // a Rust panic, as for pgrx's own bindings.
    unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| get_partition_parent(relid, false)) }
}

/// The relation a row of `rel` is reported as, and its schema: `rel`
/// itself, or for a partition the root of its partition tree (what
/// `publish_via_partition_root` publishes), so that subscribers name the
/// partitioned table and see every partition's rows under its name.
///
/// # Safety
/// `rel` is an open relation.
pub(super) unsafe fn reported_as(rel: pg_sys::Relation) -> (pg_sys::Oid, pg_sys::Oid) {
    // SAFETY: per the contract.
    let (relid, form) = unsafe { ((*rel).rd_id, &*(*rel).rd_rel) };
    if !form.relispartition {
        return (relid, form.relnamespace);
    }
    if let Some(root) = ROOTS.with(|roots| roots.borrow().get(&relid.to_u32()).copied()) {
        return root;
    }
    // SAFETY: catalog look-ups by OID; each relation walked up from is a
    // partition, so it has a parent (attached: we hold a lock on it).
    let root = unsafe {
        let mut root = parent_of(relid);
        while pg_sys::get_rel_relispartition(root) {
            root = parent_of(root);
        }
        (root, pg_sys::get_rel_namespace(root))
    };
    ROOTS.with(|roots| roots.borrow_mut().insert(relid.to_u32(), root));
    root
}

/// The description of `rel`'s rows, reported as `reported` (`rel` itself
/// or its partition root): cached by the relation that fired, whose
/// encoders read its tuples.
///
/// # Safety
/// `rel` is open for the duration of the trigger call, and `reported` is
/// what `reported_as(rel)` returned.
pub(super) unsafe fn described(rel: pg_sys::Relation, reported: pg_sys::Oid) -> Described {
    // SAFETY: per the contract.
    let own_relid = unsafe { (*rel).rd_id };
    if let Some(cached) = DESCRIBED.with(|cache| cache.borrow().get(&own_relid.to_u32()).cloned()) {
        return cached;
    }
    // Catalog look-ups may process invalidations (and so run on_relcache):
    // no borrow of the cache is held here.
    // SAFETY: per the contract; a partition's root is opened (without a
    // lock of its own: the partition's lock keeps it from being dropped)
    // just to describe it.
    let described = unsafe {
        let relation = if reported == own_relid {
            encode::describe(rel)
        } else {
            let root = pg_sys::RelationIdGetRelation(reported);
            let relation = encode::describe(root);
            pg_sys::RelationClose(root);
            relation
        };
        let encoders = encode::encoders((*rel).rd_att);
        Described {
            relation: Rc::from(relation.encode()),
            order: Order::of(&relation, &encoders),
            encoders: Rc::new(encoders),
            probe: Rc::new(Cell::new(None)),
        }
    };
    DESCRIBED.with(|cache| cache.borrow_mut().insert(own_relid.to_u32(), described.clone()));
    described
}

/// The column key filter `slot` filters rows of `relid` on, as one of the
/// relation's encoders, from the relation's cache unless the slot changed
/// since. None: every row goes on.
pub(super) fn probe_column(described: &Described, slot: usize, relid: u32) -> Option<(Probe, usize)> {
    let filters = crate::shmem::key_filters();
    let cached = described
        .probe
        .get()
        .filter(|p| p.slot == slot && p.generation == filters.generation(slot));
    let probe = match cached {
        Some(p) => p,
        None => {
            let column = filters.column(slot, relid)?;
            let p = Probe {
                slot,
                generation: column.generation,
                encoder: described.encoders.iter().position(|e| e.name == column.name),
                kind: column.kind,
            };
            described.probe.set(Some(p));
            p
        }
    };
    Some((probe, probe.encoder?))
}

/// A relation changed (or, with InvalidOid, any may have): forget what
/// this backend cached about it.
#[pg_guard]
pub(super) unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    DESCRIBED.with(|cache| forget(&mut cache.borrow_mut(), relid));
    ROOTS.with(|roots| forget(&mut roots.borrow_mut(), relid));
}

fn forget<V>(cache: &mut OidMap<V>, relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid {
        cache.clear();
    } else {
        cache.remove(&relid.to_u32());
    }
}
