//! Timers: `sleep`, `after_func`, per-P timer heaps, and the idle M that
//! sleeps until the next deadline.
//!
//! Timing on a shared machine is noisy: every test checks that a goroutine
//! wakes no earlier than its deadline, and bounds lateness generously.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::process_cpu;
use gokernel::{Deadlock, Runtime};

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

/// How late a wake-up may be before a test calls it lost.
const LATE: Duration = Duration::from_secs(5);

/// Runs `f` on a thread; fails the test if it takes over 60 s (a lost
/// wake-up would hang).
fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what}: still not done after 60 s"))
}

#[test]
fn a_sleeping_goroutine_wakes_after_its_deadline() {
    for procs in [1, 2] {
        let slept = within_a_minute("sleep(50ms)", move || {
            rt(procs).block_on(|| {
                let t = Instant::now();
                gokernel::sleep(Duration::from_millis(50));
                t.elapsed()
            })
        })
        .unwrap();
        assert!(
            slept >= Duration::from_millis(50),
            "procs {procs}: woke after {slept:?}, before its deadline"
        );
        assert!(
            slept < Duration::from_millis(50) + LATE,
            "procs {procs}: woke after {slept:?}"
        );
    }
}

/// One goroutine's sleep: its deadline, when it woke, and its place in the
/// order of wake-ups.
struct Wake {
    deadline: Instant,
    woke: Instant,
    seq: u64,
}

#[test]
fn a_thousand_goroutines_sleeping_random_durations_wake_after_their_deadlines_in_order() {
    const N: u64 = 1000;
    const MAX_MS: u64 = 600;
    // On one P, two wake-ups whose deadlines are this far apart must come
    // in order: one thread fires every timer and runs every goroutine. On
    // two Ps each P's timers are fired by the thread holding that P, so
    // the order across them is only as good as the OS schedules the two
    // threads; under load one waits hundreds of milliseconds (a thread
    // holding a P is the only one that may run its timers then). There the
    // test checks the deadlines and that no goroutine is lost.
    const MARGIN: Duration = Duration::from_millis(200);
    for procs in [1, 2] {
        let wakes: Arc<Mutex<Vec<Wake>>> = Arc::default();
        let w = wakes.clone();
        within_a_minute("1,000 sleepers", move || {
            rt(procs).block_on(move || {
                let order = Arc::new(AtomicU64::new(0));
                let hs: Vec<_> = (0..N)
                    .map(|i| {
                        let (w, order) = (w.clone(), order.clone());
                        // A fixed pseudo-random duration per goroutine.
                        let mut x = (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        x ^= x >> 29;
                        let ms = x % (MAX_MS + 1);
                        gokernel::spawn(move || {
                            let d = Duration::from_millis(ms);
                            let deadline = Instant::now() + d;
                            gokernel::sleep(d);
                            let woke = Instant::now();
                            let seq = order.fetch_add(1, Ordering::SeqCst);
                            w.lock().unwrap().push(Wake {
                                deadline,
                                woke,
                                seq,
                            });
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().unwrap();
                }
            })
        })
        .unwrap();
        let mut wakes = std::mem::take(&mut *wakes.lock().unwrap());
        assert_eq!(
            wakes.len() as u64,
            N,
            "procs {procs}: not every goroutine woke"
        );
        for w in &wakes {
            assert!(
                w.woke >= w.deadline,
                "procs {procs}: a goroutine woke {:?} before its deadline",
                w.deadline - w.woke
            );
        }
        if procs > 1 {
            continue;
        }
        wakes.sort_by_key(|w| w.seq);
        let mut inversions = 0;
        for (i, a) in wakes.iter().enumerate() {
            for b in &wakes[i + 1..] {
                // b woke after a, though its deadline was well before a's.
                if b.deadline + MARGIN < a.deadline {
                    inversions += 1;
                }
            }
        }
        assert_eq!(
            inversions, 0,
            "procs {procs}: {inversions} pairs woke out of deadline order by more than {MARGIN:?}"
        );
    }
}

#[test]
fn sleep_zero_yields_to_another_goroutine() {
    // One P: the other goroutine can only run if sleep(0) gives it up.
    let yields = rt(1)
        .block_on(|| {
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            gokernel::go(move || r.store(true, Ordering::SeqCst));
            let mut yields = 0;
            while !ran.load(Ordering::SeqCst) {
                assert!(yields < 100, "sleep(0) did not let the other goroutine run");
                gokernel::sleep(Duration::ZERO);
                yields += 1;
            }
            yields
        })
        .unwrap();
    assert!(yields >= 1, "the other goroutine ran without a yield");
}

#[test]
fn an_idle_runtime_with_a_goroutine_sleeping_300ms_burns_under_30ms_of_cpu() {
    // The measurement runs in a child process, alone: the other tests of
    // this binary would add their CPU time.
    if !common::in_crash_child() {
        let c = common::run_crash_child(
            "an_idle_runtime_with_a_goroutine_sleeping_300ms_burns_under_30ms_of_cpu",
        );
        assert_eq!(c.code, Some(0), "the child failed; stderr:\n{}", c.stderr);
        return;
    }
    let rt = rt(2);
    let before = process_cpu();
    let slept = rt
        .block_on(|| {
            let t = Instant::now();
            gokernel::sleep(Duration::from_millis(300));
            t.elapsed()
        })
        .unwrap();
    let used = process_cpu() - before;
    assert!(slept >= Duration::from_millis(300), "woke after {slept:?}");
    // Under Valgrind every thread is slow and serialised: CPU time means
    // nothing there.
    assert!(
        std::env::var_os("GOKERNEL_VALGRIND").is_some() || used < Duration::from_millis(30),
        "a runtime whose only goroutine slept 300 ms used {used:?} of CPU"
    );
}

#[test]
fn a_sleeping_goroutine_wakes_while_the_other_p_spins_without_yielding() {
    // First the sleeper must move to the idle P (we never yield), so its
    // timer is on the idle P's heap; then it sleeps on our P (we yield
    // until it parks), so its timer is on the busy P's heap. Either way the
    // idle M must wake for it while we spin.
    //
    // The second case needs Go's migration: by default a goroutine that
    // started on our thread (which it may well do once we yield) resumes
    // only there, and we do not yield again until it has woken. Bound, it
    // can only be the first case.
    for yield_first in [false, true] {
        let r = within_a_minute("spin until the sleeper wakes", move || {
            let r = if yield_first {
                // SAFETY: neither goroutine uses thread-local state, holds a
                // thread-keyed handle or unwinds across a scheduling point
                // (the main goroutine's assert fires between two).
                unsafe { Runtime::builder().procs(2).migrate_started_goroutines() }
                    .build()
                    .unwrap()
            } else {
                rt(2)
            };
            r.block_on(move || {
                let parked = Arc::new(AtomicBool::new(false));
                let woke = Arc::new(AtomicBool::new(false));
                let (p, w) = (parked.clone(), woke.clone());
                let h = gokernel::spawn(move || {
                    let t = Instant::now();
                    p.store(true, Ordering::SeqCst);
                    gokernel::sleep(Duration::from_millis(50));
                    w.store(true, Ordering::SeqCst);
                    t.elapsed()
                });
                if yield_first {
                    while !parked.load(Ordering::SeqCst) {
                        gokernel::gosched();
                    }
                }
                let t = Instant::now();
                while !woke.load(Ordering::SeqCst) {
                    assert!(
                        t.elapsed() < Duration::from_secs(20),
                        "the sleeper did not wake while the other P spun \
                         (yield_first {yield_first})"
                    );
                    std::hint::spin_loop();
                }
                h.join().unwrap()
            })
        })
        .unwrap();
        assert!(
            r >= Duration::from_millis(50),
            "yield_first {yield_first}: woke after {r:?}"
        );
    }
}

#[test]
fn a_shorter_sleep_wakes_the_m_sleeping_until_a_later_deadline() {
    let rt = rt(2);
    let slept = within_a_minute("a short sleep behind a long one", move || {
        rt.block_on(|| {
            let parked = Arc::new(AtomicBool::new(false));
            let p = parked.clone();
            gokernel::go(move || {
                p.store(true, Ordering::SeqCst);
                gokernel::sleep(Duration::from_secs(3600));
            });
            while !parked.load(Ordering::SeqCst) {
                gokernel::gosched();
            }
            // Keep our P busy a while without yielding: the other M goes
            // idle and sleeps until the one-hour deadline.
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(30) {
                std::hint::spin_loop();
            }
            let t = Instant::now();
            gokernel::sleep(Duration::from_millis(50));
            t.elapsed()
        })
    })
    .unwrap();
    assert!(slept >= Duration::from_millis(50), "woke after {slept:?}");
    assert!(
        slept < Duration::from_millis(50) + LATE,
        "woke after {slept:?}: the sleeping M was not woken for the earlier deadline"
    );
}

#[test]
fn after_func_runs_its_callback_after_the_deadline_and_it_can_wake_a_goroutine() {
    for procs in [1, 2] {
        let waited = within_a_minute("after_func", move || {
            rt(procs).block_on(|| {
                let me = gokernel::current();
                let t = Instant::now();
                gokernel::time::after_func(Duration::from_millis(30), move || me.unpark());
                gokernel::park();
                t.elapsed()
            })
        })
        .unwrap();
        assert!(
            waited >= Duration::from_millis(30),
            "procs {procs}: unparked after {waited:?}, before the deadline"
        );
        assert!(
            waited < Duration::from_millis(30) + LATE,
            "procs {procs}: unparked after {waited:?}"
        );
    }
}

#[test]
fn after_func_callbacks_run_in_deadline_order() {
    // One P, so one M runs the timers: their order is the heap's.
    let order = rt(1)
        .block_on(|| {
            let order = Arc::new(Mutex::new(Vec::new()));
            let left = Arc::new(AtomicUsize::new(200));
            let me = gokernel::current();
            for i in 0..200usize {
                let (order, left, me) = (order.clone(), left.clone(), me.clone());
                // Five deadlines 20 ms apart, registered round-robin.
                let d = Duration::from_millis(20 + 20 * (i % 5) as u64);
                gokernel::time::after_func(d, move || {
                    order.lock().unwrap().push(i);
                    if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                        me.unpark();
                    }
                });
            }
            while left.load(Ordering::SeqCst) != 0 {
                gokernel::park();
            }
            std::mem::take(&mut *order.lock().unwrap())
        })
        .unwrap();
    let mut expected: Vec<usize> = (0..200).collect();
    expected.sort_by_key(|&i| (i % 5, i));
    assert_eq!(order, expected);
}

#[test]
fn a_panicking_timer_callback_is_fatal_and_says_so() {
    if common::in_crash_child() {
        let _ = rt(1).block_on(|| {
            gokernel::time::after_func(Duration::from_millis(1), || panic!("boom in a timer"));
            gokernel::sleep(Duration::from_secs(10));
        });
        return;
    }
    let c = common::run_crash_child("a_panicking_timer_callback_is_fatal_and_says_so");
    common::assert_aborted_with(&c, &["boom in a timer", "a timer function panicked"]);
}

#[test]
fn a_timer_callback_starts_goroutines_with_go_and_spawn() {
    for procs in [1, 2] {
        let r = within_a_minute("goroutines started by a timer callback", move || {
            rt(procs).block_on(|| {
                let c = gokernel::chan::<u64>(0);
                for round in 0..20u64 {
                    let (c1, c2) = (c.clone(), c.clone());
                    gokernel::time::after_func(Duration::from_millis(1), move || {
                        gokernel::go(move || c1.send(round).unwrap());
                        // The handle is dropped: the goroutine runs on.
                        drop(gokernel::spawn(move || c2.send(1000 + round).unwrap()));
                    });
                    // Waiting on the channel (every P idle: the callback
                    // may run on an M without a P) or sleeping past it.
                    if round % 2 == 1 {
                        gokernel::sleep(Duration::from_millis(5));
                    }
                    let mut got = [c.recv().unwrap(), c.recv().unwrap()];
                    got.sort();
                    assert_eq!(got, [round, 1000 + round]);
                }
            })
        });
        assert_eq!(r, Ok(()), "procs {procs}");
    }
}

#[test]
fn a_deadlock_is_still_reported_when_only_a_timer_free_park_remains() {
    for procs in [1, 2] {
        let r = within_a_minute("deadlock after a sleep", move || {
            rt(procs).block_on(|| {
                gokernel::sleep(Duration::from_millis(10));
                gokernel::park();
            })
        });
        assert!(matches!(r, Err(Deadlock { .. })), "procs {procs}");
    }
}

#[test]
fn goroutines_sleeping_on_timers_are_not_a_deadlock() {
    for procs in [1, 2] {
        let r = within_a_minute("block_on(sleep)", move || {
            let rt = rt(procs);
            let alone = rt.block_on(|| gokernel::sleep(Duration::from_millis(100)));
            // Beside a goroutine parked for good, the sleeper still counts.
            let beside = rt.block_on(|| {
                gokernel::go(gokernel::park);
                gokernel::sleep(Duration::from_millis(100));
            });
            (alone, beside)
        });
        assert_eq!(r, (Ok(()), Ok(())), "procs {procs}");
    }
}

#[test]
fn dropping_the_runtime_while_goroutines_sleep_for_an_hour_returns_promptly() {
    let token = Arc::new(());
    let ran = Arc::new(AtomicBool::new(false));
    let (tok, r) = (token.clone(), ran.clone());
    let took = within_a_minute("drop with sleepers", move || {
        let rt = rt(2);
        let started = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            let s = started.clone();
            rt.spawn(move || {
                s.fetch_add(1, Ordering::SeqCst);
                gokernel::sleep(Duration::from_secs(3600));
            });
        }
        rt.spawn(move || {
            gokernel::time::after_func(Duration::from_secs(3600), move || {
                drop(tok);
                r.store(true, Ordering::SeqCst);
            })
        })
        .join()
        .unwrap();
        while started.load(Ordering::SeqCst) < 10 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Let them park and the Ms go idle.
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        drop(rt);
        t.elapsed()
    });
    assert!(took < LATE, "dropping the runtime took {took:?}");
    assert!(
        !ran.load(Ordering::SeqCst),
        "a timer callback ran at shutdown"
    );
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "the pending callback was not dropped with the runtime"
    );
}

#[test]
fn sleep_on_a_plain_thread_sleeps_the_thread() {
    let t = Instant::now();
    gokernel::sleep(Duration::from_millis(30));
    assert!(
        t.elapsed() >= Duration::from_millis(30),
        "{:?}",
        t.elapsed()
    );
    gokernel::sleep(Duration::ZERO);
}
