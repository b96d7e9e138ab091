//! One scheduler operation, N times, for timing and for instruction counts.
//!
//! ```text
//! cargo run --release --example ops -- OP N [PROCS]
//! ```
//!
//! OP is one of:
//! - `gosched`: two goroutines yield to each other; one op = one `gosched`;
//! - `spawn`: spawn + run + exit of an empty goroutine, in batches of 1,000
//!   (stacks reused); one op = one goroutine;
//! - `handoff`: two goroutines pass a token with park / unpark; one op =
//!   one one-way hand-off.
//!
//! Under `valgrind --tool=callgrind`, run N and 2N: the instructions per op
//! are (Ir(2N) - Ir(N)) / N, free of start-up costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use gokernel::Runtime;

fn gosched_pair(n: u64) {
    let hs: Vec<_> = (0..2)
        .map(|_| {
            gokernel::spawn(move || {
                for _ in 0..n / 2 {
                    gokernel::gosched();
                }
            })
        })
        .collect();
    hs.into_iter().for_each(|h| h.join().unwrap());
}

fn spawn_batches(n: u64) {
    const BATCH: u64 = 1000;
    let main = gokernel::current();
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH);
        left -= k;
        let pending = Arc::new(AtomicU64::new(k));
        for _ in 0..k {
            let (pending, main) = (pending.clone(), main.clone());
            gokernel::go(move || {
                if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                    main.unpark();
                }
            });
        }
        while pending.load(Ordering::Acquire) != 0 {
            gokernel::park();
        }
    }
}

fn handoff(n: u64) {
    let main = gokernel::current();
    let peer_slot = Arc::new(OnceLock::new());
    let ps = peer_slot.clone();
    let peer = gokernel::spawn(move || {
        ps.set(gokernel::current()).unwrap();
        for _ in 0..n / 2 {
            gokernel::park();
            main.unpark();
        }
    });
    while peer_slot.get().is_none() {
        gokernel::gosched();
    }
    let p = peer_slot.get().unwrap().clone();
    for _ in 0..n / 2 {
        p.unpark();
        gokernel::park();
    }
    peer.join().unwrap();
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: ops gosched|spawn|handoff N [PROCS]";
    let op = args.next().expect(usage);
    let n: u64 = args
        .next()
        .expect(usage)
        .parse()
        .expect("N must be a whole number");
    let procs: usize = args
        .next()
        .map_or(1, |p| p.parse().expect("PROCS must be a whole number"));
    let f: fn(u64) = match op.as_str() {
        "gosched" => gosched_pair,
        "spawn" => spawn_batches,
        "handoff" => handoff,
        _ => panic!("{usage}"),
    };
    let rt = Runtime::builder().procs(procs).build().unwrap();
    let t = Instant::now();
    rt.block_on(move || f(n)).unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{op}: {n} ops on {procs} P: {:.1} ns/op",
        secs * 1e9 / n as f64
    );
}
