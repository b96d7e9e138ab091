//! One million goroutines parked at once, then all are woken and finish.
//!
//! With guard markers (Linux 6.13 and later, `stack::guard_markers`) a
//! million guarded stacks fit under any `vm.max_map_count`: they come in
//! chunks of 64 per mapping. With `mprotect` guards each guarded stack
//! costs two kernel mappings, so a million of them need
//! `vm.max_map_count` above 2,008,192 (65,530 by default). As root, the
//! test raises the sysctl to 2,200,000 (never lowers it) and the
//! million stacks have guard pages; otherwise it says so on stderr and
//! builds its runtime with the `unsafe` `Builder::unguarded_stacks` (arena
//! stacks, which fit under the default limit).
//!
//! Alone in its test binary: it needs a few GiB and reads RSS.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{mappings, raise_max_map_count, rss_kb};
use gokernel::{Goroutine, Runtime};

const N: usize = 1_000_000;

#[test]
fn a_million_goroutines_park_at_once_then_all_wake_and_finish() {
    let markers = gokernel::stack::guard_markers();
    let guarded = markers || raise_max_map_count("million");
    let builder = Runtime::builder()
        .procs(2)
        .stack_size(gokernel::stack::STACK_MIN);
    let builder = if guarded {
        builder
    } else {
        // SAFETY: these goroutines push a handle and park: a few hundred
        // bytes of their 32 KiB stacks.
        unsafe { builder.unguarded_stacks() }
    };
    let rt = builder.build().unwrap();
    let t = std::time::Instant::now();
    let rss0 = rss_kb();
    let (parked_rss, maps, alive, live) = rt
        .block_on(|| {
            let handles: Arc<Mutex<Vec<Goroutine>>> = Arc::new(Mutex::new(Vec::with_capacity(N)));
            let finished = Arc::new(AtomicUsize::new(0));
            let main = gokernel::current();
            for _ in 0..N {
                let (handles, finished, main) = (handles.clone(), finished.clone(), main.clone());
                gokernel::go(move || {
                    handles.lock().unwrap().push(gokernel::current());
                    gokernel::park();
                    if finished.fetch_add(1, Ordering::AcqRel) + 1 == N {
                        main.unpark();
                    }
                });
            }
            // Let every one of them run up to its park.
            while handles.lock().unwrap().len() < N {
                gokernel::gosched();
            }
            let alive = gokernel::num_goroutine();
            let parked_rss = rss_kb();
            let maps = mappings();
            let live = gokernel::stack::guarded_stacks_live();
            for g in handles.lock().unwrap().drain(..) {
                g.unpark();
            }
            while finished.load(Ordering::Acquire) < N {
                gokernel::park();
            }
            (parked_rss, maps, alive, live)
        })
        .unwrap();
    let per_g = (parked_rss - rss0) * 1024 / N as u64;
    eprintln!(
        "{N} parked goroutines ({} stacks): RSS {rss0} -> {parked_rss} kB ({per_g} B per parked G), \
         {maps} mappings, {:.1} s",
        if guarded { "guarded" } else { "unguarded" },
        t.elapsed().as_secs_f64()
    );
    assert_eq!(alive, N + 1, "all goroutines (and main) alive while parked");
    if markers {
        assert!(
            live > N,
            "{live} guarded stacks live: the stacks are not guarded"
        );
        assert!(
            maps < N / gokernel::stack::CHUNK_SLOTS + 8192,
            "{maps} mappings: more than a chunk per 64 stacks"
        );
    } else if guarded {
        assert!(
            maps >= N * gokernel::stack::MAPPINGS_PER_GUARDED_STACK,
            "{maps} mappings: the stacks are not guarded"
        );
        assert!(
            maps <= gokernel::stack::max_map_count(),
            "{maps} mappings: over vm.max_map_count"
        );
    } else {
        assert!(maps < 65_530, "{maps} mappings: over vm.max_map_count");
    }
}
