//! The scheduler through the public API: spawn / join, parallelism,
//! stealing, yielding, parking, fairness without preemption, and clear
//! panics outside a runtime.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gokernel::proc::RandomOrder;
use std::sync::OnceLock;

use common::busy_peers;
use gokernel::{BuildError, Goroutine, MAX_PROCS, Runtime, getg};

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

/// Spins until `cond` holds, failing the test after `secs` seconds.
fn spin_until(what: &str, secs: u64, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::hint::spin_loop();
    }
}

#[test]
fn block_on_returns_the_main_goroutines_value() {
    let r = rt(2);
    assert_eq!(r.block_on(|| 6 * 7).unwrap(), 42);
    assert_eq!(r.block_on(|| "again").unwrap(), "again");
}

#[test]
fn spawn_and_join_return_values_and_a_panic_comes_back_as_err() {
    let r = rt(2);
    r.block_on(|| {
        let h = gokernel::spawn(|| 5);
        assert_eq!(h.join().unwrap(), 5);
        let h = gokernel::spawn(|| -> u32 { panic!("goroutine boom") });
        let err = h.join().unwrap_err();
        assert_eq!(err.downcast_ref::<&str>(), Some(&"goroutine boom"));
    })
    .unwrap();
}

#[test]
fn join_from_a_plain_thread_blocks_until_the_goroutine_finishes() {
    let r = rt(2);
    let h = r.spawn(|| {
        for _ in 0..100 {
            gokernel::gosched();
        }
        "done"
    });
    assert_eq!(h.join().unwrap(), "done");
}

/// Go's TestGoroutineParallelism: `procs` Gs take turns on one counter
/// without yielding, which only finishes if all of them run at once.
fn goroutine_parallelism(procs: usize, nested: bool) {
    let r = rt(procs);
    r.block_on(move || {
        for _ in 0..10 {
            let x = Arc::new(AtomicU32::new(0));
            let body = move |p: usize, x: Arc<AtomicU32>| {
                move || {
                    for i in 0..3 {
                        let expected = (procs * i + p) as u32;
                        spin_until("the other goroutines to advance", 20, || {
                            x.load(Ordering::SeqCst) == expected
                        });
                        x.store(expected + 1, Ordering::SeqCst);
                    }
                }
            };
            let hs: Vec<_> = (0..procs)
                .map(|p| {
                    let g = body(p, x.clone());
                    if nested {
                        gokernel::spawn(move || gokernel::spawn(g).join().unwrap())
                    } else {
                        gokernel::spawn(g)
                    }
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
        }
    })
    .unwrap();
    let stolen: u64 = r.p_stats().iter().map(|p| p.stolen).sum();
    assert!(stolen > 0, "parallel Gs must have been stolen by other Ps");
}

#[test]
fn goroutines_run_in_parallel_on_2_procs() {
    goroutine_parallelism(2, false);
}

#[test]
fn goroutines_run_in_parallel_on_4_procs() {
    goroutine_parallelism(4, false);
}

#[test]
fn goroutines_spawned_from_goroutines_run_in_parallel_on_2_and_4_procs() {
    goroutine_parallelism(2, true);
    goroutine_parallelism(4, true);
}

#[test]
fn a_million_goroutines_spawned_from_goroutines_all_run_exactly_once() {
    const SPAWNERS: usize = 10;
    const BATCH: usize = 1000;
    const BATCHES: usize = 100;
    const TOTAL: usize = SPAWNERS * BATCH * BATCHES;
    let r = rt(2);
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..TOTAL).map(|_| AtomicU8::new(0)).collect());
    let s2 = seen.clone();
    r.block_on(move || {
        let spawners: Vec<_> = (0..SPAWNERS)
            .map(|s| {
                let seen = s2.clone();
                gokernel::spawn(move || {
                    let me = gokernel::current();
                    for b in 0..BATCHES {
                        // At most BATCH children alive per spawner.
                        let left = Arc::new(AtomicUsize::new(BATCH));
                        for i in 0..BATCH {
                            let idx = (s * BATCHES + b) * BATCH + i;
                            let (seen, left, me) = (seen.clone(), left.clone(), me.clone());
                            gokernel::go(move || {
                                seen[idx].fetch_add(1, Ordering::Relaxed);
                                if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                                    me.unpark();
                                }
                            });
                        }
                        while left.load(Ordering::Acquire) != 0 {
                            gokernel::park();
                        }
                    }
                })
            })
            .collect();
        for h in spawners {
            h.join().unwrap();
        }
    })
    .unwrap();
    let bad: Vec<_> = (0..TOTAL)
        .filter(|&i| seen[i].load(Ordering::Relaxed) != 1)
        .take(10)
        .collect();
    assert!(
        bad.is_empty(),
        "goroutines not run exactly once, e.g. {bad:?}"
    );
    // The main G's result arrives just before it exits.
    spin_until("every goroutine to exit", 10, || r.num_goroutine() == 0);
    let spawned: u64 = r.p_stats().iter().map(|p| p.spawned).sum();
    assert!(spawned >= TOTAL as u64, "spawned {spawned}");
}

fn nest(depth: u32) -> u32 {
    if depth == 0 {
        return 0;
    }
    gokernel::spawn(move || nest(depth - 1)).join().unwrap() + 1
}

#[test]
fn nested_spawns_ten_deep_all_complete() {
    let r = rt(2);
    assert_eq!(r.block_on(|| nest(10)).unwrap(), 10);
}

#[test]
fn a_goroutine_spinning_on_a_flag_makes_progress_through_gosched() {
    let r = rt(1);
    r.block_on(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let setter = gokernel::spawn(move || {
            gokernel::gosched();
            f2.store(true, Ordering::SeqCst);
        });
        let mut spins = 0u64;
        while !flag.load(Ordering::SeqCst) {
            gokernel::gosched();
            spins += 1;
            assert!(spins < 1_000_000, "the setter never ran");
        }
        setter.join().unwrap();
    })
    .unwrap();
}

/// The id of the M running the current goroutine.
fn current_m_id() -> i64 {
    // SAFETY: on a goroutine: its M is live.
    unsafe { (*(*getg()).m()).id() }
}

#[test]
fn current_and_getg_stay_right_after_a_goroutine_moves_to_another_m() {
    // Only Go's migration moves a started goroutine: by default it stays on
    // the thread it started on (tests/binding.rs), and no move ever comes.
    // SAFETY: these goroutines use no thread-local state but the runtime's
    // own (getg, which is what this test checks), hold no thread-keyed
    // handle and unwind across no scheduling point.
    let r = unsafe { Runtime::builder().procs(2).migrate_started_goroutines() }
        .build()
        .unwrap();
    r.block_on(|| {
        let stop = Arc::new(AtomicBool::new(false));
        // Busy peers keep both Ps' queues moving.
        let peers = busy_peers(4, &stop);
        let mover = gokernel::spawn(|| {
            let me = getg();
            let id = gokernel::current().id();
            let first_m = current_m_id();
            let mut moves = 0;
            // Bounded by time, not by a count of yields: on a loaded
            // machine the second M's thread may not get a core for a
            // while, and 200,000 yields can pass before it does.
            // Under Valgrind (one thread at a time) a move may never come.
            let patience = if std::env::var_os("GOKERNEL_VALGRIND").is_some() {
                2
            } else {
                20
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(patience);
            while std::time::Instant::now() < deadline {
                gokernel::gosched();
                assert_eq!(getg(), me, "getg() changed after gosched");
                assert_eq!(gokernel::current().id(), id, "current() changed");
                if current_m_id() != first_m {
                    moves += 1;
                    if moves > 10 {
                        break;
                    }
                }
            }
            moves
        });
        let moves = mover.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        for p in peers {
            p.join().unwrap();
        }
        // Valgrind runs one thread at a time in long slices: a move may
        // not happen there, and the checks above are what matter.
        if std::env::var_os("GOKERNEL_VALGRIND").is_none() {
            assert!(moves > 0, "the goroutine never ran on another M");
        }
    })
    .unwrap();
}

#[test]
fn an_unpark_before_park_is_not_lost() {
    let r = rt(2);
    r.block_on(|| {
        let me = gokernel::current();
        me.unpark();
        me.unpark(); // tokens do not accumulate
        gokernel::park(); // returns at once: the token was there
        let other = {
            let me = me.clone();
            gokernel::spawn(move || me.unpark())
        };
        gokernel::park(); // woken by `other` (before or after we park)
        other.join().unwrap();
    })
    .unwrap();
}

#[test]
fn join_leaves_the_goroutines_park_token_alone() {
    for procs in [1, 2] {
        let r = rt(procs).block_on(|| {
            let me = gokernel::current();
            me.unpark();
            // The join has to wait (the goroutine sleeps first); it must
            // not take our token for its own wake-up.
            let h = gokernel::spawn(|| {
                gokernel::sleep(Duration::from_millis(20));
                7
            });
            assert_eq!(h.join().unwrap(), 7);
            gokernel::park(); // returns at once: the token is still there
        });
        assert_eq!(
            r,
            Ok(()),
            "the park token was consumed by join ({procs} procs)"
        );
    }
}

#[test]
fn join_from_a_plain_thread_leaves_its_park_token_alone() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = rt(2);
        std::thread::current().unpark();
        let h = r.spawn(|| {
            gokernel::sleep(Duration::from_millis(20));
            7
        });
        assert_eq!(h.join().unwrap(), 7);
        std::thread::park(); // returns at once: the token is still there
        tx.send(()).unwrap();
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)),
        Ok(()),
        "the thread's park token was consumed by join"
    );
}

/// Spawns a G that publishes its handle and then runs `body`; returns the
/// join handle and, once it is up, the G's handle.
fn spawn_with_handle(
    body: impl FnOnce() + Send + 'static,
) -> (gokernel::JoinHandle<()>, Goroutine) {
    let slot: Arc<OnceLock<Goroutine>> = Arc::new(OnceLock::new());
    let s2 = slot.clone();
    let h = gokernel::spawn(move || {
        s2.set(gokernel::current()).unwrap();
        body();
    });
    let mut waited = 0u64;
    while slot.get().is_none() {
        gokernel::gosched();
        waited += 1;
        assert!(waited < 10_000_000, "the spawned goroutine never started");
    }
    (h, slot.get().unwrap().clone())
}

#[test]
fn park_unpark_ping_pong_between_two_goroutines_counts_exactly() {
    const ROUNDS: u64 = 100_000;
    for procs in [1, 2] {
        let r = rt(procs);
        let (main_count, peer_count) = r
            .block_on(|| {
                let main = gokernel::current();
                let peer_count = Arc::new(AtomicU64::new(0));
                let pc = peer_count.clone();
                let (h, peer) = spawn_with_handle(move || {
                    for _ in 0..ROUNDS {
                        gokernel::park();
                        pc.fetch_add(1, Ordering::Relaxed);
                        main.unpark();
                    }
                });
                let mut main_count = 0;
                for _ in 0..ROUNDS {
                    peer.unpark();
                    gokernel::park();
                    main_count += 1;
                }
                h.join().unwrap();
                (main_count, peer_count.load(Ordering::Relaxed))
            })
            .unwrap();
        assert_eq!(
            (main_count, peer_count),
            (ROUNDS, ROUNDS),
            "procs = {procs}"
        );
    }
}

#[test]
fn a_ping_pong_pair_cannot_starve_a_third_goroutine() {
    const LIMIT: u64 = 1_000_000;
    let r = rt(1);
    let third_ran_at = r
        .block_on(|| {
            let main = gokernel::current();
            let stop = Arc::new(AtomicBool::new(false));
            let st = stop.clone();
            // The partner answers every wake-up by waking us: the two hand
            // `runnext` back and forth on the single P.
            let (partner_h, partner) = spawn_with_handle(move || {
                loop {
                    gokernel::park();
                    if st.load(Ordering::Acquire) {
                        break;
                    }
                    main.unpark();
                }
            });
            let exchanges = Arc::new(AtomicU64::new(0));
            let ran_at = Arc::new(AtomicU64::new(u64::MAX));
            let (ex, ra) = (exchanges.clone(), ran_at.clone());
            let third = gokernel::spawn(move || {
                ra.store(ex.load(Ordering::Relaxed), Ordering::Release);
            });
            while ran_at.load(Ordering::Acquire) == u64::MAX
                && exchanges.load(Ordering::Relaxed) < LIMIT
            {
                partner.unpark();
                gokernel::park();
                exchanges.fetch_add(1, Ordering::Relaxed);
            }
            stop.store(true, Ordering::Release);
            partner.unpark();
            partner_h.join().unwrap();
            third.join().unwrap();
            ran_at.load(Ordering::Acquire)
        })
        .unwrap();
    assert!(
        third_ran_at < LIMIT,
        "the third goroutine waited for the whole ping-pong ({LIMIT} exchanges)"
    );
    // Quick hand-offs reach the count backstop before sysmon's 10 ms slice.
    assert!(
        third_ran_at <= 2 * u64::from(gokernel::runtime2::RUNNEXT_LIMIT),
        "ran after {third_ran_at}"
    );
}

#[test]
fn every_coprime_stride_walk_visits_each_p_exactly_once() {
    for count in 1..=64u32 {
        let order = RandomOrder::new(count);
        for i in 0..(count * 70) {
            let mut seen = vec![0u32; count as usize];
            for p in order.start(i.wrapping_mul(2_654_435_761)) {
                seen[p as usize] += 1;
            }
            assert!(
                seen.iter().all(|&n| n == 1),
                "count {count}, start {i}: {seen:?}"
            );
        }
    }
}

#[test]
fn builder_rejects_bad_procs_and_stack_sizes_naming_the_bound() {
    let e = Runtime::builder().procs(0).build().err().unwrap();
    assert_eq!(e, BuildError::Procs { procs: 0 });
    assert!(e.to_string().contains("between 1 and 1024"), "{e}");
    let e = Runtime::builder()
        .procs(MAX_PROCS + 1)
        .build()
        .err()
        .unwrap();
    assert_eq!(
        e,
        BuildError::Procs {
            procs: MAX_PROCS + 1
        }
    );
    let e = Runtime::builder().stack_size(1000).build().err().unwrap();
    assert!(e.to_string().contains("minimum of 32768"), "{e}");
}

#[test]
fn builder_rounds_a_stack_size_up_to_a_whole_page() {
    let r = Runtime::builder()
        .procs(1)
        .stack_size(40_000)
        .build()
        .expect("a stack size that is not a page multiple is rounded up");
    let size = r
        .block_on(|| {
            // SAFETY: getg() is the running goroutine.
            let s = unsafe { (*getg()).stack() };
            s.hi() - s.lo()
        })
        .unwrap();
    assert_eq!(size, 40_960);
    // Rounded before the bounds are checked: just under the minimum is
    // the minimum.
    assert!(
        Runtime::builder()
            .stack_size(gokernel::stack::STACK_MIN - 100)
            .build()
            .is_ok()
    );
}

#[test]
fn procs_defaults_to_the_cpu_count() {
    let r = Runtime::builder().build().unwrap();
    assert_eq!(
        r.procs(),
        std::thread::available_parallelism().unwrap().get()
    );
}

#[test]
fn dropping_the_runtime_stops_its_threads() {
    let r = rt(2);
    r.block_on(|| {
        let hs: Vec<_> = (0..8).map(|_| gokernel::spawn(gokernel::gosched)).collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
    })
    .unwrap();
    drop(r);
    // Other tests' runtimes run in this process too: only check that ours
    // went away, by waiting for the count to drop to what others hold.
    spin_until("the M threads to exit", 10, || common::m_threads() <= 8 * 4);
}

#[test]
fn api_calls_outside_a_goroutine_panic_with_a_clear_message() {
    let msg = |f: fn()| {
        let e = std::panic::catch_unwind(f).unwrap_err();
        e.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    for (name, f) in [
        ("spawn", (|| drop(gokernel::spawn(|| ()))) as fn()),
        ("go", || gokernel::go(|| ())),
        ("current", || drop(gokernel::current())),
        ("park", gokernel::park),
        ("num_goroutine", || {
            let _ = gokernel::num_goroutine();
        }),
    ] {
        let m = msg(f);
        assert!(
            m.contains(&format!("gokernel::{name} called outside a goroutine")),
            "{name}: {m:?}"
        );
    }
    let e = std::panic::catch_unwind(gokernel::gosched).unwrap_err();
    let m = e.downcast_ref::<&str>().copied().unwrap_or_default();
    assert!(m.contains("gosched called outside a goroutine"), "{m:?}");
    let r = rt(1);
    let nested = r
        .block_on(|| {
            let inner = rt(1);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.block_on(|| ())))
                .unwrap_err()
                .downcast_ref::<&str>()
                .copied()
                .unwrap_or_default()
        })
        .unwrap();
    assert!(
        nested.contains("block_on called from a goroutine"),
        "{nested:?}"
    );
}

/// Runs `f` on a thread and fails the test if it does not finish in
/// `secs` seconds (a lost wake-up would otherwise hang the test run).
fn within(secs: u64, what: &'static str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish in {secs} s: a lost wake-up?"));
}

#[test]
fn wakeups_of_idle_ms_are_never_lost() {
    within(120, "10,000 spawns onto an idle runtime", || {
        let r = rt(2);
        for i in 0..10_000u32 {
            // Now and then let every M go idle first.
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(r.spawn(move || i).join().unwrap(), i);
        }
    });
    within(120, "park/unpark across Ms going idle", || {
        let r = rt(2);
        r.block_on(|| {
            for _ in 0..2_000 {
                let main = gokernel::current();
                let h = gokernel::spawn(move || main.unpark());
                gokernel::park();
                h.join().unwrap();
            }
        })
        .unwrap();
    });
}

#[test]
fn spawning_onto_another_runtime_from_a_goroutine_runs_there() {
    let a = rt(1);
    let b = Arc::new(rt(2));
    let b2 = b.clone();
    let v = a
        .block_on(move || b2.spawn(|| 21 * 2).join().unwrap())
        .unwrap();
    assert_eq!(v, 42);
    let on_b: u64 = b.p_stats().iter().map(|p| p.scheduled).sum();
    let spawned_on_a: u64 = a.p_stats().iter().map(|p| p.spawned).sum();
    assert!(
        on_b >= 1,
        "the goroutine did not run on the runtime it was spawned on"
    );
    assert_eq!(spawned_on_a, 0, "runtime A created a goroutine meant for B");
}

/// Runs 100 goroutines whose closures carry `W` words of payload and a
/// drop counter, and checks that each ran once, saw its payload, and
/// dropped its captures once; returns the closures' size in bytes.
fn run_closures_of<const W: usize>(r: &Runtime) -> usize {
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    struct Payload<const W: usize> {
        words: [u64; W],
        _c: Counted,
    }
    const N: u64 = 100;
    let dropped = Arc::new(AtomicUsize::new(0));
    let d = dropped.clone();
    let (size, sum) = r
        .block_on(move || {
            let main = gokernel::current();
            let sum = Arc::new(AtomicU64::new(0));
            let left = Arc::new(AtomicU64::new(N));
            let mut size = 0;
            for i in 0..N {
                let p = Payload {
                    words: [i; W],
                    _c: Counted(d.clone()),
                };
                let (sum, left, main) = (sum.clone(), left.clone(), main.clone());
                let f = move || {
                    let p = p;
                    sum.fetch_add(p.words.iter().sum::<u64>(), Ordering::SeqCst);
                    if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                        main.unpark();
                    }
                };
                size = std::mem::size_of_val(&f);
                gokernel::go(f);
            }
            while left.load(Ordering::SeqCst) != 0 {
                gokernel::park();
            }
            (size, sum.load(Ordering::SeqCst))
        })
        .unwrap();
    assert_eq!(sum, (0..N).sum::<u64>() * W as u64, "a payload was lost");
    // A goroutine drops its closure before it exits: all have by the time
    // the runtime has no goroutine left.
    spin_until("every closure to be dropped", 20, || {
        dropped.load(Ordering::SeqCst) >= N as usize
    });
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        N as usize,
        "a closure dropped twice"
    );
    size
}

#[test]
fn closures_that_fit_in_the_g_and_larger_boxed_ones_run_once_and_drop_once() {
    use gokernel::runtime2::STARTFN_INLINE;
    let r = rt(1);
    // The captures besides the payload: the counter, `sum`, `left`, `main`.
    const OTHERS: usize = 3 * 8 + std::mem::size_of::<Goroutine>();
    const FITS: usize = (STARTFN_INLINE - OTHERS) / 8;
    assert_eq!(
        run_closures_of::<FITS>(&r),
        STARTFN_INLINE,
        "the largest inline closure"
    );
    assert!(
        run_closures_of::<{ FITS + 1 }>(&r) > STARTFN_INLINE,
        "a boxed closure"
    );
    assert!(
        run_closures_of::<0>(&r) < STARTFN_INLINE,
        "a small inline closure"
    );
}
