//! A tour of the scheduler: spawn, yield, park and unpark, work stealing
//! across Ms, channels with select, Mutex and WaitGroup, then a per-P
//! summary.
//!
//! ```text
//! cargo run --release --example tour -- [PROCS]
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use gokernel::sync::{Mutex, WaitGroup};
use gokernel::{Runtime, chan, select};

fn main() {
    let procs = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("PROCS must be a whole number"))
        .unwrap_or(2);
    let rt = Runtime::builder().procs(procs).build().expect("runtime");
    println!("gokernel tour on {} Ps", rt.procs());

    // 1. Spawn and join: a fan-out of 10,000 goroutines summing squares.
    let t = Instant::now();
    let sum = rt
        .block_on(|| {
            let hs: Vec<_> = (0..10_000u64)
                .map(|i| gokernel::spawn(move || i * i))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
        })
        .unwrap();
    println!(
        "spawn/join: 10,000 goroutines, sum of squares {sum} in {:?}",
        t.elapsed()
    );

    // 2. Yield: goroutines that take turns with gosched.
    let turns = Arc::new(AtomicU64::new(0));
    let t2 = turns.clone();
    rt.block_on(move || {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let turns = t2.clone();
                gokernel::spawn(move || {
                    for _ in 0..10_000 {
                        turns.fetch_add(1, Ordering::Relaxed);
                        gokernel::gosched();
                    }
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
    })
    .unwrap();
    println!(
        "gosched: 8 goroutines took {} turns",
        turns.load(Ordering::Relaxed)
    );

    // 3. Park and unpark: a token passed around a ring of 100 goroutines.
    let t = Instant::now();
    let passes = rt
        .block_on(|| {
            const N: usize = 100;
            const LAPS: u64 = 1_000;
            let ring: Arc<Vec<OnceLock<gokernel::Goroutine>>> =
                Arc::new((0..N).map(|_| OnceLock::new()).collect());
            let passes = Arc::new(AtomicU64::new(0));
            let hs: Vec<_> = (0..N)
                .map(|i| {
                    let (ring, passes) = (ring.clone(), passes.clone());
                    gokernel::spawn(move || {
                        ring[i].set(gokernel::current()).unwrap();
                        for _ in 0..LAPS {
                            gokernel::park();
                            passes.fetch_add(1, Ordering::Relaxed);
                            ring[(i + 1) % N].get().unwrap().unpark();
                        }
                    })
                })
                .collect();
            while ring.iter().any(|g| g.get().is_none()) {
                gokernel::gosched();
            }
            ring[0].get().unwrap().unpark();
            hs.into_iter().for_each(|h| h.join().unwrap());
            passes.load(Ordering::Relaxed)
        })
        .unwrap();
    println!(
        "park/unpark: the token went {passes} times around a ring of 100 in {:?}",
        t.elapsed()
    );

    // 4. Stealing: a CPU-bound job split into many goroutines.
    let t = Instant::now();
    let total = rt
        .block_on(|| {
            let hs: Vec<_> = (0..64u64)
                .map(|i| {
                    gokernel::spawn(move || {
                        let mut x = i;
                        for _ in 0..2_000_000 {
                            x = x
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                        }
                        x
                    })
                })
                .collect();
            hs.into_iter().fold(0u64, |a, h| a ^ h.join().unwrap())
        })
        .unwrap();
    println!(
        "work: 64 CPU-bound goroutines (checksum {total:x}) in {:?}",
        t.elapsed()
    );

    // 5. Channels and select: a pipeline. Generators send numbers on two
    //    unbuffered channels; a merger selects over both (and a quit
    //    channel) and passes squares on through a buffered one; workers
    //    sum them under a Mutex; a WaitGroup says when all are done.
    let t = Instant::now();
    let (total, merged) = rt
        .block_on(|| {
            let (evens, odds, quit) = (chan::<u64>(0), chan::<u64>(0), chan::<()>(0));
            let squares = chan::<u64>(64);
            for (ch, first) in [(evens.clone(), 0u64), (odds.clone(), 1)] {
                gokernel::go(move || {
                    for i in (first..20_000).step_by(2) {
                        ch.send(i).unwrap();
                    }
                    ch.close().unwrap();
                });
            }
            let merger = {
                let (evens, odds, quit, squares) =
                    (evens.clone(), odds.clone(), quit.clone(), squares.clone());
                gokernel::spawn(move || {
                    let mut merged = 0u64;
                    // Until one generator is done (a closed channel stays
                    // ready, so from then on only the other is read).
                    let rest = loop {
                        let (v, other) = select! {
                            recv(evens) -> v => (v, &odds),
                            recv(odds) -> v => (v, &evens),
                            recv(quit) -> _stop => return merged,
                        };
                        match v {
                            Ok(v) => squares.send(v * v).unwrap(),
                            Err(_closed) => break other,
                        }
                        merged += 1;
                    };
                    for v in rest {
                        squares.send(v * v).unwrap();
                        merged += 1;
                    }
                    squares.close().unwrap();
                    merged
                })
            };
            let total = Arc::new(Mutex::new(0u64));
            let wg = Arc::new(WaitGroup::new());
            for _ in 0..4 {
                wg.add(1);
                let (squares, total, wg) = (squares.clone(), total.clone(), wg.clone());
                gokernel::go(move || {
                    for sq in &squares {
                        *total.lock() += sq;
                    }
                    wg.done();
                });
            }
            wg.wait();
            drop(quit);
            let merged = merger.join().unwrap();
            let total = *total.lock();
            (total, merged)
        })
        .unwrap();
    println!(
        "channels: {merged} numbers merged by select, sum of squares {total} in {:?}",
        t.elapsed()
    );

    // The last main goroutine hands back its result just before it exits.
    let t = Instant::now();
    while rt.num_goroutine() != 0 && t.elapsed().as_secs() < 1 {
        std::thread::yield_now();
    }

    println!();
    println!(
        "{:>3} {:>9} {:>8} {:>8} {:>10} {:>9}",
        "P", "spawned", "stolen", "parked", "scheduled", "runq-hwm"
    );
    for p in rt.p_stats() {
        println!(
            "{:>3} {:>9} {:>8} {:>8} {:>10} {:>9}",
            p.id, p.spawned, p.stolen, p.parked, p.scheduled, p.runq_hwm
        );
    }
    println!(
        "goroutines left: {}, Gs allocated: {}",
        rt.num_goroutine(),
        rt.num_allocated_gs()
    );
}
