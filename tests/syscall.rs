//! Blocking calls (`gokernel::blocking`, `gokernel::syscall::call`): the P
//! goes to other goroutines while a goroutine blocks its thread, sysmon
//! retakes the P of a long `call`, and every odd use has a defined
//! behaviour.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::within;
use gokernel::{Runtime, blocking, chan};

fn tid() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// Waits (blocking the thread, as a C call would) until `flag` is set or
/// `limit` passes; true if the flag was set.
fn wait_flag(flag: &AtomicBool, limit: Duration) -> bool {
    let t = Instant::now();
    while !flag.load(Ordering::Acquire) {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

/// Eight goroutines each block their thread in a call on 2 Ps, while a
/// ticker sleeps 10 ms at a time and counts the ticks it makes while more
/// calls are in progress than there are Ps. Each call holds its thread
/// until all eight are in progress at once and the ticker has ticked twice
/// so (or until a 20 s limit, which fails the checks). Returns (the most
/// calls in progress at once, those ticks).
fn eight_calls_and_a_ticker(rt: &Runtime, locked_ticker: bool) -> (u32, u32) {
    let most = Arc::new(AtomicU32::new(0));
    // Calls in progress now.
    let live = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicU32::new(0));
    let crowded = Arc::new(AtomicU32::new(0));
    let (d2, l2, c2) = (done.clone(), live.clone(), crowded.clone());
    rt.block_on(move || {
        let tick = move || {
            while d2.load(Ordering::Acquire) < 8 {
                gokernel::sleep(Duration::from_millis(10));
                if l2.load(Ordering::Acquire) > 2 {
                    c2.fetch_add(1, Ordering::AcqRel);
                }
            }
        };
        let ticker = if locked_ticker {
            gokernel::spawn_locked(tick)
        } else {
            gokernel::spawn(tick)
        };
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let (done, most, live, crowded) =
                    (done.clone(), most.clone(), live.clone(), crowded.clone());
                gokernel::spawn(move || {
                    blocking(|| {
                        let now = live.fetch_add(1, Ordering::AcqRel) + 1;
                        most.fetch_max(now, Ordering::AcqRel);
                        let t = Instant::now();
                        while (most.load(Ordering::Acquire) < 8
                            || crowded.load(Ordering::Acquire) < 2)
                            && t.elapsed() < Duration::from_secs(20)
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        live.fetch_sub(1, Ordering::AcqRel);
                    });
                    done.fetch_add(1, Ordering::AcqRel);
                })
            })
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        ticker.join().unwrap();
        (
            most.load(Ordering::Acquire),
            crowded.load(Ordering::Acquire),
        )
    })
    .unwrap()
}

/// Held Ps would let at most 2 calls be in progress at once, and give the
/// ticker, which needs a P for each tick, none while more than 2 are: the
/// calls would each wait out their 20 s limit.
fn check_eight((most, crowded): (u32, u32)) {
    assert_eq!(
        most, 8,
        "at most {most} of the 8 calls were in progress at once"
    );
    assert!(
        crowded >= 2,
        "the ticker ticked {crowded} times while more calls than Ps were in progress"
    );
}

#[test]
fn eight_blocking_calls_on_two_ps_overlap_and_a_locked_ticker_keeps_ticking() {
    let rt = Runtime::builder().procs(2).build().unwrap();
    let r = within(60, "eight blocking calls", move || {
        eight_calls_and_a_ticker(&rt, true)
    });
    check_eight(r);
}

#[test]
fn eight_blocking_calls_on_two_ps_overlap_with_migration_and_a_plain_ticker() {
    // SAFETY: these goroutines keep nothing thread-local across a yield.
    let rt = unsafe { Runtime::builder().procs(2).migrate_started_goroutines() }
        .build()
        .unwrap();
    let r = within(60, "eight blocking calls", move || {
        eight_calls_and_a_ticker(&rt, false)
    });
    check_eight(r);
}

#[test]
fn a_long_call_has_its_p_retaken_for_the_goroutine_waiting_behind_it() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    let ran = within(20, "the retake", move || {
        rt.block_on(|| {
            let flag = Arc::new(AtomicBool::new(false));
            let f2 = flag.clone();
            // Queued on our single P: it runs only if the P leaves us.
            gokernel::go(move || f2.store(true, Ordering::Release));
            // `call` keeps the P: only sysmon's retake frees it.
            gokernel::syscall::call(|| wait_flag(&flag, Duration::from_secs(5)))
        })
        .unwrap()
    });
    assert!(
        ran,
        "the queued goroutine never ran while the call lasted 5 s"
    );
}

#[test]
fn an_overdue_timer_fires_while_every_p_is_in_a_call() {
    let rt = Runtime::builder().procs(2).build().unwrap();
    let (fired_inside, entered) = within(20, "the timer", move || {
        rt.block_on(|| {
            let fired = Arc::new(AtomicBool::new(false));
            let entered = Arc::new(AtomicU32::new(0));
            let f2 = fired.clone();
            gokernel::time::after_func(Duration::from_millis(30), move || {
                f2.store(true, Ordering::Release)
            });
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let (fired, entered) = (fired.clone(), entered.clone());
                    gokernel::spawn(move || {
                        gokernel::syscall::call(|| {
                            entered.fetch_add(1, Ordering::AcqRel);
                            wait_flag(&fired, Duration::from_secs(5))
                        })
                    })
                })
                .collect();
            let all = hs.into_iter().all(|h| h.join().unwrap());
            (all, entered.load(Ordering::Acquire))
        })
        .unwrap()
    });
    assert_eq!(entered, 2);
    assert!(
        fired_inside,
        "the timer did not fire while both calls waited for it"
    );
}

#[test]
fn goroutines_all_in_calls_are_not_a_deadlock() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    within(20, "calls", move || {
        let r = rt.block_on(|| {
            blocking(|| std::thread::sleep(Duration::from_millis(30)));
            gokernel::syscall::call(|| std::thread::sleep(Duration::from_millis(30)));
            7
        });
        assert_eq!(r, Ok(7));
    });
}

#[test]
fn a_goroutine_goes_on_on_its_own_thread_after_a_blocking_call() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    within(20, "blocking", move || {
        rt.block_on(|| {
            let stop = Arc::new(AtomicBool::new(false));
            // Keeps the P busy while we are in the call (it takes it).
            let peer = common::busy_peers(1, &stop);
            for _ in 0..20 {
                let before = tid();
                blocking(|| std::thread::sleep(Duration::from_millis(2)));
                assert_eq!(tid(), before, "resumed on another thread");
            }
            stop.store(true, Ordering::Relaxed);
            peer.into_iter().for_each(|h| h.join().unwrap());
        })
        .unwrap();
    });
}

#[test]
fn blocking_outside_a_goroutine_just_runs_the_function() {
    assert_eq!(blocking(|| 5), 5);
    assert_eq!(gokernel::syscall::call(|| 6), 6);
    let rt = Runtime::builder().procs(1).build().unwrap();
    // On an M's own stack (g0): inline too.
    let r = rt
        .block_on(|| gokernel::systemstack(|| blocking(|| 8)))
        .unwrap();
    assert_eq!(r, 8);
}

#[test]
fn nested_blocking_calls_run_inline() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    let r = within(20, "nested", move || {
        rt.block_on(|| blocking(|| gokernel::syscall::call(|| blocking(|| 3)) + 1))
            .unwrap()
    });
    assert_eq!(r, 4);
}

#[test]
fn a_panic_inside_blocking_unwinds_with_the_p_back() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    within(20, "panic", move || {
        rt.block_on(|| {
            let t = tid();
            let r = std::panic::catch_unwind(|| blocking(|| panic!("inside the call")));
            assert!(r.is_err());
            assert_eq!(tid(), t);
            // The goroutine has its P: the scheduler works as before.
            let c = chan::<u32>(0);
            let c2 = c.clone();
            gokernel::go(move || c2.send(9).unwrap());
            gokernel::gosched();
            assert_eq!(c.recv(), Ok(9));
        })
        .unwrap();
    });
}

#[test]
fn gokernel_calls_inside_blocking_work() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    let got = within(20, "calls inside blocking", move || {
        rt.block_on(|| {
            let t = tid();
            let got = blocking(|| {
                // Needs no P: the new goroutine goes to the global queue.
                let c = chan::<u64>(0);
                let c2 = c.clone();
                gokernel::go(move || c2.send(41).unwrap());
                // Needs a P: the call is left for the receive.
                let v = c.recv().unwrap();
                gokernel::gosched();
                gokernel::sleep(Duration::from_millis(1));
                let h = gokernel::spawn(|| 1u64);
                v + h.join().unwrap()
            });
            assert_eq!(tid(), t);
            got
        })
        .unwrap()
    });
    assert_eq!(got, 42);
}

#[test]
fn a_runtime_dropped_during_a_blocking_call_unwinds_the_goroutine_afterwards() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    let inside = Arc::new(AtomicBool::new(false));
    let i2 = inside.clone();
    let h = rt.spawn(move || {
        blocking(|| {
            i2.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_millis(50));
        });
        gokernel::park(); // never unparked: unwound here
    });
    assert!(wait_flag(&inside, Duration::from_secs(5)));
    within(20, "the drop", move || drop(rt));
    let err = h.join().unwrap_err();
    assert!(err.downcast_ref::<gokernel::RuntimeDropped>().is_some());
}

#[test]
fn many_short_calls_on_two_ps_all_finish() {
    // The fast path and the retake racing: every call comes back.
    let rt = Runtime::builder().procs(2).build().unwrap();
    let n = within(30, "short calls", move || {
        rt.block_on(|| {
            let total = Arc::new(AtomicU64::new(0));
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let total = total.clone();
                    gokernel::spawn(move || {
                        for j in 0..2000u64 {
                            let d = if (i + j) % 97 == 0 { 50 } else { 0 };
                            gokernel::syscall::call(|| {
                                if d > 0 {
                                    std::thread::sleep(Duration::from_micros(d));
                                }
                            });
                            total.fetch_add(1, Ordering::Relaxed);
                            if j % 64 == 0 {
                                gokernel::gosched();
                            }
                        }
                    })
                })
                .collect();
            hs.into_iter().for_each(|h| h.join().unwrap());
            total.load(Ordering::Relaxed)
        })
        .unwrap()
    });
    assert_eq!(n, 8000);
}

#[test]
fn a_locked_goroutine_keeps_its_thread_across_a_blocking_call() {
    let rt = Runtime::builder().procs(1).build().unwrap();
    within(20, "locked", move || {
        rt.block_on(|| {
            let h = gokernel::spawn_locked(|| {
                let t = tid();
                let ran = Arc::new(AtomicBool::new(false));
                let r2 = ran.clone();
                // Needs the only P while we are in the call.
                gokernel::go(move || r2.store(true, Ordering::Release));
                let seen = blocking(|| wait_flag(&ran, Duration::from_secs(5)));
                (seen, tid() == t)
            });
            assert_eq!(h.join().unwrap(), (true, true));
        })
        .unwrap();
    });
}
