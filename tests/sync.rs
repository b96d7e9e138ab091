//! `Mutex`, `WaitGroup` and `Once` for goroutines and plain threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;

use gokernel::Runtime;
use gokernel::sync::{Mutex, Once, WaitGroup};

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

#[test]
fn mutex_keeps_a_count_exact_under_goroutines_that_park_while_holding_it() {
    rt(2)
        .block_on(|| {
            let m = Arc::new(Mutex::new(0u64));
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let m = m.clone();
                    gokernel::spawn(move || {
                        for i in 0..10_000 {
                            let mut g = m.lock();
                            let v = *g;
                            if i % 64 == 0 {
                                // Yield while holding it: others must queue.
                                gokernel::gosched();
                            }
                            *g = v + 1;
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(*m.lock(), 80_000);
            assert!(!m.is_locked());
        })
        .unwrap();
}

#[test]
fn mutex_is_shared_by_goroutines_and_plain_threads() {
    let m = Arc::new(Mutex::new(0u64));
    let r = rt(2);
    let gs: Vec<_> = (0..4)
        .map(|_| {
            let m = m.clone();
            r.spawn(move || {
                for _ in 0..20_000 {
                    *m.lock() += 1;
                }
            })
        })
        .collect();
    let ts: Vec<_> = (0..2)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    *m.lock() += 1;
                }
            })
        })
        .collect();
    for h in gs {
        h.join().unwrap();
    }
    for t in ts {
        t.join().unwrap();
    }
    assert_eq!(*m.lock(), 120_000);
}

#[test]
fn a_waiter_gets_the_mutex_while_a_fast_locker_keeps_taking_it() {
    // Starvation mode: one goroutine locks and unlocks in a tight loop and
    // never yields; another asks once. Without a bound, the woken waiter
    // would keep losing the race to the running locker.
    rt(2)
        .block_on(|| {
            let m = Arc::new(Mutex::new(()));
            let waiter_done = Arc::new(AtomicBool::new(false));
            let hog_laps = Arc::new(AtomicU64::new(0));
            let hog = {
                let (m, waiter_done, laps) = (m.clone(), waiter_done.clone(), hog_laps.clone());
                gokernel::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut g = m.lock();
                    while !waiter_done.load(Ordering::Relaxed) && Instant::now() < deadline {
                        // Hold it a little (a waiter has to queue), then
                        // unlock and at once lock again: the woken waiter
                        // is always too late unless the lock is handed to
                        // it.
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_micros(5) {
                            std::hint::spin_loop();
                        }
                        drop(g);
                        g = m.lock();
                        laps.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(g);
                })
            };
            // Let the hog get going, then ask for the lock.
            while hog_laps.load(Ordering::Relaxed) < 1000 {
                gokernel::gosched();
            }
            let asked = Instant::now();
            drop(m.lock());
            let waited = asked.elapsed();
            waiter_done.store(true, Ordering::Relaxed);
            hog.join().unwrap();
            assert!(
                waited < Duration::from_secs(5),
                "the waiter waited {waited:?} behind the fast locker"
            );
        })
        .unwrap();
}

#[test]
fn starvation_mode_hands_the_mutex_to_a_waiter_that_lost_too_often() {
    // Deterministic on one P: the locker yields while holding the lock, so
    // the waiter runs, finds it held and queues; each unlock wakes the
    // waiter, but the locker locks again before the waiter runs. Only the
    // hand-off of starvation mode lets the waiter in before the locker's
    // 1,000 laps are over.
    rt(1)
        .block_on(|| {
            let m = Arc::new(Mutex::new(()));
            let laps = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let locker = {
                let (m, laps, stop) = (m.clone(), laps.clone(), stop.clone());
                gokernel::spawn(move || {
                    while laps.load(Ordering::SeqCst) < 1000 && !stop.load(Ordering::SeqCst) {
                        let g = m.lock();
                        laps.fetch_add(1, Ordering::SeqCst);
                        gokernel::gosched();
                        drop(g);
                    }
                })
            };
            while laps.load(Ordering::SeqCst) < 10 {
                gokernel::gosched();
            }
            let asked_at = laps.load(Ordering::SeqCst);
            drop(m.lock());
            let got_at = laps.load(Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
            locker.join().unwrap();
            // MUTEX_STARVE_AFTER (4) lost rounds, the hand-off, and slack.
            assert!(
                got_at - asked_at <= 8,
                "the waiter got the lock after {} of the locker's laps",
                got_at - asked_at
            );
        })
        .unwrap();
}

#[test]
fn try_lock_fails_while_held_and_succeeds_after() {
    let m = Mutex::new(5);
    let g = m.lock();
    assert!(m.try_lock().is_none());
    drop(g);
    assert_eq!(*m.try_lock().unwrap(), 5);
    let mut m = m;
    *m.get_mut() = 6;
    assert_eq!(m.into_inner(), 6);
}

#[test]
fn waitgroup_wait_returns_after_every_goroutine_is_done() {
    rt(2)
        .block_on(|| {
            let wg = Arc::new(WaitGroup::new());
            let finished = Arc::new(AtomicUsize::new(0));
            for _ in 0..1000 {
                wg.add(1);
                let (wg, finished) = (wg.clone(), finished.clone());
                gokernel::go(move || {
                    gokernel::gosched();
                    finished.fetch_add(1, Ordering::SeqCst);
                    wg.done();
                });
            }
            // Several waiters, goroutines and a thread, all released.
            let waiters: Vec<_> = (0..3)
                .map(|_| {
                    let (wg, finished) = (wg.clone(), finished.clone());
                    gokernel::spawn(move || {
                        wg.wait();
                        finished.load(Ordering::SeqCst)
                    })
                })
                .collect();
            wg.wait();
            assert_eq!(finished.load(Ordering::SeqCst), 1000);
            for w in waiters {
                assert_eq!(w.join().unwrap(), 1000);
            }
            assert_eq!(wg.count(), 0);
            // Reusable, and a zero count does not wait.
            wg.wait();
            wg.add(2);
            wg.done();
            wg.done();
            wg.wait();
        })
        .unwrap();
}

#[test]
fn waitgroup_counter_going_negative_panics_with_gos_message() {
    let wg = WaitGroup::new();
    wg.add(1);
    let err = std::panic::catch_unwind(|| wg.add(-2)).unwrap_err();
    assert_eq!(
        err.downcast_ref::<&str>(),
        Some(&"sync: negative WaitGroup counter")
    );
    assert_eq!(wg.count(), 1, "the failed add changed the count");
    wg.done();
}

#[test]
fn waitgroup_counter_overflow_panics_saying_so_and_leaves_the_group_usable() {
    let wg = Arc::new(WaitGroup::new());
    wg.add(i64::MAX);
    let err = std::panic::catch_unwind(|| wg.add(1)).unwrap_err();
    let msg = err
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| err.downcast_ref::<String>().map(|s| s.as_str()))
        .unwrap_or("<not a string>")
        .to_string();
    assert_eq!(msg, "sync: WaitGroup counter overflow");
    // The lock was released: the next call returns (the old code spun
    // forever here), with the count unchanged.
    let (tx, rx) = std::sync::mpsc::channel();
    let w = wg.clone();
    std::thread::spawn(move || tx.send(w.count()).unwrap());
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(i64::MAX),
        "the WaitGroup stayed locked after the overflow panic"
    );
    wg.add(-i64::MAX);
    wg.wait();
}

#[test]
fn once_runs_its_function_once_and_everyone_sees_it_done() {
    rt(2)
        .block_on(|| {
            let once = Arc::new(Once::new());
            let runs = Arc::new(AtomicUsize::new(0));
            let value = Arc::new(AtomicUsize::new(0));
            let hs: Vec<_> = (0..100)
                .map(|_| {
                    let (once, runs, value) = (once.clone(), runs.clone(), value.clone());
                    gokernel::spawn(move || {
                        once.call_once(|| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            // Take a while, so others queue behind us.
                            for _ in 0..100 {
                                gokernel::gosched();
                            }
                            value.store(42, Ordering::SeqCst);
                        });
                        value.load(Ordering::SeqCst)
                    })
                })
                .collect();
            for h in hs {
                assert_eq!(
                    h.join().unwrap(),
                    42,
                    "call_once returned before the function finished"
                );
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1);
            assert!(once.is_completed());
        })
        .unwrap();
}

#[test]
fn once_called_recursively_from_its_own_function_panics_naming_the_goroutine() {
    let msg = rt(1)
        .block_on(|| {
            let once = Arc::new(Once::new());
            let o = once.clone();
            let h = gokernel::spawn(move || o.call_once(|| o.call_once(|| ())));
            let id = h.id();
            let err = h.join().unwrap_err();
            let msg = err.downcast_ref::<String>().cloned().unwrap();
            // Done even though its function panicked, as in Go.
            assert!(once.is_completed());
            (msg, id)
        })
        .unwrap();
    assert_eq!(
        msg.0,
        format!(
            "sync: Once.call_once called recursively by goroutine {}",
            msg.1
        )
    );
}

#[test]
fn once_called_recursively_on_a_plain_thread_panics_naming_the_thread() {
    // Before, the inner call waited for the outer one: a silent hang.
    let msg = common::within(30, "a recursive call_once on a plain thread", || {
        std::thread::Builder::new()
            .name("initializer".into())
            .spawn(|| {
                let once = Once::new();
                let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    once.call_once(|| once.call_once(|| ()))
                }))
                .unwrap_err();
                assert!(once.is_completed());
                err.downcast_ref::<String>().cloned().unwrap()
            })
            .unwrap()
            .join()
            .unwrap()
    });
    assert!(
        msg.starts_with("sync: Once.call_once called recursively by thread \"initializer\""),
        "{msg}"
    );
}
