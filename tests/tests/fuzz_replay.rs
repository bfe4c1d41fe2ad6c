//! Replays every committed fuzz input (`fuzz/corpus/TARGET/*` and
//! `fuzz/regressions/TARGET/*`) through the fuzz targets' bodies, without the
//! fuzzer: each must return without panicking, quickly.

use std::time::{Duration, Instant};

#[path = "../../fuzz/src/lib.rs"]
mod targets;

#[test]
fn every_committed_fuzz_input_replays_cleanly() {
    let fuzz = tandem_tests::root().join("fuzz");
    for (target, run) in targets::TARGETS {
        let mut inputs = 0;
        for set in ["corpus", "regressions"] {
            let dir = fuzz.join(set).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("directory entry").path();
                let data = std::fs::read(&path).expect("readable input");
                let start = Instant::now();
                run(&data);
                let took = start.elapsed();
                assert!(
                    took < Duration::from_secs(5),
                    "{}: {took:?}",
                    path.display()
                );
                inputs += 1;
            }
        }
        assert!(inputs > 0, "no committed inputs for {target}");
    }
}
