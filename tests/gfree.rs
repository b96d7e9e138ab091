//! Dead Gs and their stacks are kept for reuse after a burst (no stack is
//! freed, and none made, per goroutine), and idle Ms give the ones that
//! sit unused back lazily (`gftrim`).

mod common;

use std::time::{Duration, Instant};

use gokernel::Runtime;
use gokernel::proc::GFREE_MAX;

/// Spawns `n` goroutines, all alive at once (on 1 P none starts before the
/// spawner blocks), and joins them.
fn burst(rt: &Runtime, n: usize) {
    rt.block_on(move || {
        let hs: Vec<_> = (0..n).map(|i| gokernel::spawn(move || i)).collect();
        let sum: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(sum, n * (n - 1) / 2);
    })
    .unwrap();
}

#[test]
fn a_burst_of_dead_gs_is_reused_by_the_next_burst_then_trimmed_when_idle() {
    const BURST: usize = 4 * GFREE_MAX;
    let rt = Runtime::builder().procs(1).build().unwrap();
    burst(&rt, BURST);
    let first = rt.num_allocated_gs();
    assert!(first >= BURST, "{first} Gs for {BURST} alive at once");
    // Every G of the first burst was kept: the second makes none.
    burst(&rt, BURST);
    let second = rt.num_allocated_gs();
    assert_eq!(second, first, "the second burst allocated new Gs");
    // Idle now: each time the M goes idle (here, while the main goroutine
    // sleeps, and after it), Gs that sat unused through an interval are
    // freed, down to GFREE_MAX (plus what the P keeps locally: under 64
    // with stacks, under NOSTACK_LOCAL_MAX without, and the main
    // goroutine). On 1 P most of the burst never had a stack (they ran one
    // at a time and took one as they started: gokernel::lazystack); the
    // Gs without stacks are trimmed the same way.
    let limit = GFREE_MAX + 64 + gokernel::lazystack::NOSTACK_LOCAL_MAX as usize + 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt.num_allocated_gs() > limit {
        assert!(
            Instant::now() < deadline,
            "{} Gs still allocated after 20 s idle (limit {limit})",
            rt.num_allocated_gs()
        );
        rt.block_on(|| gokernel::sleep(Duration::from_millis(20)))
            .unwrap();
    }
}

/// KiB of its stack each goroutine of the bulk-free test touches.
const TOUCHED_KIB: usize = 16;

/// Uses [`TOUCHED_KIB`] KiB of the calling goroutine's stack, so that
/// those pages are resident.
#[inline(never)]
fn touch_stack() {
    let a = [1u8; 1024 * TOUCHED_KIB];
    std::hint::black_box(&a);
}

#[test]
fn freeing_dead_goroutines_in_bulk_gives_their_stack_pages_back() {
    // Hosted stack frees go in batches (one process_madvise per 256
    // stacks): each stack must still have its pages dropped, not only
    // its slot returned.
    if !common::in_crash_child() {
        // Alone in a process of its own: RSS is the whole process's.
        common::run_child_ok("freeing_dead_goroutines_in_bulk_gives_their_stack_pages_back");
        return;
    }
    const N: usize = 2_000;
    const KIB: usize = TOUCHED_KIB;
    let rt = Runtime::builder().procs(1).build().unwrap();
    let before = common::rss_kb();
    rt.block_on(|| {
        let gate = gokernel::chan::<()>(0);
        let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hs: Vec<_> = (0..N)
            .map(|_| {
                let (gate, started) = (gate.clone(), started.clone());
                gokernel::spawn(move || {
                    touch_stack();
                    started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = gate.recv();
                })
            })
            .collect();
        // Until every one has touched its stack and is parked or about to.
        while started.load(std::sync::atomic::Ordering::SeqCst) < N {
            gokernel::gosched();
        }
        gate.close().unwrap();
        hs.into_iter().for_each(|h| h.join().unwrap());
    })
    .unwrap();
    let peak = common::rss_kb();
    assert!(
        peak >= before + (N * KIB / 2) as u64,
        "RSS {before} -> {peak} KiB: the stacks were not touched"
    );
    let freed = rt.free_dead_goroutines();
    assert!(freed >= N - 64, "freed {freed} of {N}");
    let after = common::rss_kb();
    assert!(
        peak - after >= (N * KIB * 3 / 4) as u64,
        "RSS {before} -> {peak} -> {after} KiB: freeing {freed} dead goroutines gave back too little"
    );
}
