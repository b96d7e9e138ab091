//! One million goroutines parked at once, with the kernel's default
//! mapping limit (`vm.max_map_count` = 65,530): guard pages while the
//! budget lasts, arena stacks beyond it. Then all are woken and finish.
//!
//! Alone in its test binary: it needs a few GiB and reads RSS.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{mappings, rss_kb};
use gokernel::{Goroutine, Runtime};

const N: usize = 1_000_000;

#[test]
fn a_million_goroutines_park_at_once_then_all_wake_and_finish() {
    let rt = Runtime::builder()
        .procs(2)
        .stack_size(gokernel::stack::STACK_MIN)
        .build()
        .unwrap();
    let rss0 = rss_kb();
    let (parked_rss, maps, alive) = rt
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
            for g in handles.lock().unwrap().drain(..) {
                g.unpark();
            }
            while finished.load(Ordering::Acquire) < N {
                gokernel::park();
            }
            (parked_rss, maps, alive)
        })
        .unwrap();
    let per_g = (parked_rss - rss0) * 1024 / N as u64;
    eprintln!(
        "{N} parked goroutines: RSS {rss0} -> {parked_rss} kB ({per_g} B per parked G), {maps} mappings"
    );
    assert_eq!(alive, N + 1, "all goroutines (and main) alive while parked");
    assert!(maps < 65_530, "{maps} mappings: over vm.max_map_count");
}
