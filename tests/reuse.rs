//! G and stack reuse: a million short goroutines in sequence allocate a
//! few thousand Gs at most and keep RSS bounded.
//!
//! Alone in its test binary: it reads this process's RSS.

mod common;

use common::rss_kb;
use gokernel::Runtime;

#[test]
fn a_million_short_goroutines_in_sequence_reuse_gs_and_keep_rss_bounded() {
    const ROUNDS: usize = 10_000;
    const PER_ROUND: usize = 100;
    let rt = Runtime::builder().procs(2).build().unwrap();
    // Warm up: allocator, thread stacks, the first Gs.
    rt.block_on(|| {
        for _ in 0..PER_ROUND {
            gokernel::spawn(|| ()).join().unwrap();
        }
    })
    .unwrap();
    let rss0 = rss_kb();
    let total = rt
        .block_on(|| {
            let mut total = 0usize;
            for _ in 0..ROUNDS {
                let hs: Vec<_> = (0..PER_ROUND).map(|i| gokernel::spawn(move || i)).collect();
                total += hs.into_iter().map(|h| h.join().unwrap()).sum::<usize>();
            }
            total
        })
        .unwrap();
    let rss1 = rss_kb();
    // Each round's goroutines return 0..PER_ROUND.
    assert_eq!(total, ROUNDS * PER_ROUND * (PER_ROUND - 1) / 2);
    let allocated = rt.num_allocated_gs();
    // At most PER_ROUND + the main G alive at once, plus what sits on free
    // lists between Ps: a few hundred, not a million. (A P keeps up to
    // NOSTACK_LOCAL_MAX dead Gs without stacks, a few hundred bytes each,
    // and a goroutine spawned on one P and first run on the other leaves
    // its G on the other's list: gokernel::lazystack.)
    let lists = 2 * gokernel::lazystack::NOSTACK_LOCAL_MAX as usize;
    assert!(
        allocated <= 4 * PER_ROUND + lists,
        "{allocated} Gs allocated for 1,000,000 goroutines"
    );
    assert!(
        std::env::var_os("GOKERNEL_VALGRIND").is_some() || rss1 <= rss0 + 16 * 1024,
        "RSS grew from {rss0} kB to {rss1} kB over 1,000,000 goroutines"
    );
    eprintln!("1,000,000 goroutines: {allocated} Gs allocated, RSS {rss0} -> {rss1} kB");
}
