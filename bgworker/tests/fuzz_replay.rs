//! Every saved fuzz input (`fuzz/corpus/<target>/`, and what fuzzing found
//! and was fixed, `fuzz/regressions/<target>/`) through its target, on the
//! stable toolchain: a regression shows in `make unit` without fuzzing.

use std::path::{Path, PathBuf};

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
