//! Every saved fuzz input (`fuzz/corpus/<target>/`, and what fuzzing found
//! and was fixed, `fuzz/regressions/<target>/`) through its target, on the
//! stable toolchain: a regression shows in `make unit` without fuzzing.

use bgworker::shared::wire::{Change, ChangeKind, Column, Relation, Transaction};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

#[test]
fn every_saved_fuzz_input_runs_clean() {
    for (name, target) in bgworker::fuzzing::TARGETS {
        let mut replayed = 0;
        for kind in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                let ran = std::panic::catch_unwind(|| target(&bytes));
                assert!(ran.is_ok(), "{name}: {} panicked", path.display());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no saved inputs for fuzz target {name}");
    }
}

/// Writes the `record` target's seeds: records as a backend encodes them.
/// (`cargo test -p bgworker --test fuzz_replay -- --ignored`)
#[test]
#[ignore]
fn write_record_seeds() {
    let column = |name: &str, typname: &str, type_oid: u32| Column {
        name: name.into(),
        typname: typname.into(),
        type_oid,
    };
    let change = |kind, record: Option<&str>, old: Option<&str>| Change {
        relation: 0,
        kind,
        record: record.map(str::to_owned),
        old: old.map(str::to_owned),
        filter_at: if record.is_some() { vec![6, 14] } else { vec![] },
    };
    let t = Transaction {
        xid: 742,
        commit_lsn: 0x1_6B37_4D48,
        commit_time_us: 1_741_083_072_345_000,
        relations: vec![Arc::new(Relation {
            relid: 16384,
            schema: "public".into(),
            table: "messages".into(),
            columns: vec![column("id", "int8", 20), column("body", "text", 25)],
            identity: vec![0],
            primary_key: vec![0],
        })],
        changes: vec![
            change(ChangeKind::Insert, Some(r#"{"id":1,"body":"hé"}"#), None),
            change(
                ChangeKind::Update,
                Some(r#"{"id":1,"body":"x"}"#),
                Some(r#"{"id":1,"body":"hé"}"#),
            ),
            change(ChangeKind::Delete, None, Some(r#"{"id":1,"body":"x"}"#)),
            change(ChangeKind::Truncate, None, None),
        ],
        overflowed: false,
    };
    let dir = fuzz_dir().join("corpus/record");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("four_kinds"), t.encode()).unwrap();
    let overflowed = Transaction {
        changes: vec![],
        overflowed: true,
        ..t
    };
    std::fs::write(dir.join("overflowed"), overflowed.encode()).unwrap();
}
