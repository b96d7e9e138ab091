//! Dead Gs and their stacks are kept for reuse after a burst (no stack is
//! freed, and none made, per goroutine), and idle Ms give the ones that
//! sit unused back lazily (`gftrim`).

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
