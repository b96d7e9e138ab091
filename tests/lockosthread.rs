//! `lock_os_thread` / `unlock_os_thread` (Go's LockOSThread): a locked
//! goroutine runs only on its M and that M runs only it, across yields and
//! parks; locks nest; a locked goroutine that exits, deadlocks or is left
//! parked at shutdown leaves the runtime in order.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{busy_peers, within};
use gokernel::{Deadlock, Runtime, getg};

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

/// The id of the M running the calling goroutine (re-read from the G on
/// every call).
fn current_m_id() -> i64 {
    // SAFETY: on a goroutine: its M is live.
    unsafe { (*(*getg()).m()).id() }
}

/// The calling OS thread's id, from the kernel (never cached).
fn tid() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

fn valgrind() -> bool {
    std::env::var_os("GOKERNEL_VALGRIND").is_some()
}

/// `n` rounds, or a fiftieth of them under Valgrind: it runs one thread at
/// a time, and each round of a locked goroutine among busy peers waits for
/// thread switches (10,000 rounds took from 15 s to 12 minutes there).
fn rounds(n: usize) -> usize {
    if valgrind() { n / 50 } else { n }
}

/// Parks the calling goroutine and has a fresh goroutine wake it.
fn park_and_get_woken() {
    let me = gokernel::current();
    gokernel::go(move || me.unpark());
    gokernel::park();
}

#[test]
fn a_locked_goroutine_keeps_its_m_and_thread_across_10000_goscheds_and_parks() {
    let r = rt(2);
    r.block_on(|| {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = busy_peers(4, &stop);
        let locked = gokernel::spawn_locked(|| {
            let (m, t) = (current_m_id(), tid());
            for i in 0..rounds(10_000) {
                gokernel::gosched();
                assert_eq!(current_m_id(), m, "moved to another M after gosched {i}");
                assert_eq!(tid(), t, "moved to another thread after gosched {i}");
                park_and_get_woken();
                assert_eq!(current_m_id(), m, "moved to another M after park {i}");
                assert_eq!(tid(), t, "moved to another thread after park {i}");
            }
            gokernel::unlock_os_thread();
        });
        locked.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        for p in peers {
            p.join().unwrap();
        }
    })
    .unwrap();
}

#[test]
fn no_other_goroutine_runs_on_the_m_of_a_locked_goroutine() {
    let r = rt(2);
    r.block_on(|| {
        // The locked goroutine's M id while it is locked, else 0.
        let locked_m = Arc::new(AtomicI64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // Runs of other goroutines seen during the locked period, and those
        // of them that were on the locked M.
        let seen = Arc::new(AtomicU64::new(0));
        let intruders = Arc::new(AtomicU64::new(0));
        let others: Vec<_> = (0..8)
            .map(|_| {
                let (locked_m, stop) = (locked_m.clone(), stop.clone());
                let (seen, intruders) = (seen.clone(), intruders.clone());
                gokernel::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        // No switch between these two reads: if the locked
                        // period covered the first, this M ran us during it.
                        let lm = locked_m.load(Ordering::SeqCst);
                        let me = current_m_id();
                        if lm != 0 {
                            seen.fetch_add(1, Ordering::Relaxed);
                            if me == lm {
                                intruders.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if seen.load(Ordering::Relaxed) % 7 == 0 {
                            park_and_get_woken();
                        } else {
                            gokernel::gosched();
                        }
                    }
                })
            })
            .collect();
        let lm = locked_m.clone();
        let locked = gokernel::spawn_locked(move || {
            lm.store(current_m_id(), Ordering::SeqCst);
            for _ in 0..rounds(2_000) {
                gokernel::gosched();
                park_and_get_woken();
            }
            lm.store(0, Ordering::SeqCst);
            gokernel::unlock_os_thread();
        });
        locked.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        for o in others {
            o.join().unwrap();
        }
        let (seen, intruders) = (
            seen.load(Ordering::SeqCst),
            intruders.load(Ordering::SeqCst),
        );
        assert!(
            seen as usize > rounds(100),
            "other goroutines barely ran: {seen} runs"
        );
        assert_eq!(
            intruders, 0,
            "{intruders} of {seen} runs of other goroutines were on the locked M"
        );
    })
    .unwrap();
}

#[test]
fn locks_nest_and_an_unlock_without_a_lock_does_nothing() {
    let r = rt(2);
    r.block_on(|| {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = busy_peers(4, &stop);
        gokernel::unlock_os_thread(); // no lock: nothing to undo
        assert_eq!(gokernel::stats().locked_ms, 0);
        gokernel::lock_os_thread();
        gokernel::lock_os_thread();
        gokernel::unlock_os_thread();
        assert_eq!(gokernel::stats().locked_ms, 1, "one lock is left");
        let m = current_m_id();
        for i in 0..rounds(2_000) {
            gokernel::gosched();
            assert_eq!(
                current_m_id(),
                m,
                "moved after gosched {i} with one lock left"
            );
        }
        gokernel::unlock_os_thread();
        assert_eq!(gokernel::stats().locked_ms, 0, "the last unlock unlocks");
        gokernel::unlock_os_thread(); // one too many: nothing happens
        assert_eq!(gokernel::stats().locked_ms, 0);
        // Unlocked, it is an ordinary started goroutine again: it stays on
        // the thread it started on (see tests/binding.rs for the opt-in
        // that lets it move).
        for i in 0..rounds(2_000) {
            gokernel::gosched();
            assert_eq!(current_m_id(), m, "moved after gosched {i}, unlocked");
        }
        stop.store(true, Ordering::Relaxed);
        for p in peers {
            p.join().unwrap();
        }
    })
    .unwrap();
}

#[test]
fn goroutines_that_exit_locked_leave_the_runtime_working_and_their_ms_reusable() {
    let r = rt(2);
    r.block_on(|| {
        for _ in 0..200 {
            let h = gokernel::spawn_locked(|| {
                gokernel::lock_os_thread();
                gokernel::gosched();
                current_m_id()
            });
            h.join().unwrap();
        }
        // Every M came back unlocked and took other work: spawn plenty.
        let hs: Vec<_> = (0..1_000u64).map(|i| gokernel::spawn(move || i)).collect();
        let sum: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(sum, 999 * 1_000 / 2);
        // A result arrives just before its goroutine exits (and unlocks):
        // the last one may still be on its way out.
        let deadline = Instant::now() + Duration::from_secs(20);
        while gokernel::stats().locked_ms != 0 {
            assert!(
                Instant::now() < deadline,
                "an exited goroutine left its M locked"
            );
            gokernel::gosched();
        }
        let s = gokernel::stats();
        assert!(
            s.threads <= 16,
            "200 locked goroutines exiting made {} threads: their Ms were not reused",
            s.threads
        );
    })
    .unwrap();
}

#[test]
fn shutdown_with_a_locked_goroutine_parked_forever_returns_promptly() {
    for procs in [1, 2] {
        within(30, "dropping the runtime", move || {
            let r = rt(procs);
            let (tx, rx) = std::sync::mpsc::channel();
            r.spawn(move || {
                gokernel::lock_os_thread();
                tx.send(()).unwrap();
                gokernel::park(); // never woken
            });
            rx.recv().unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while r.stats().idle_locked_ms != 1 {
                assert!(
                    Instant::now() < deadline,
                    "the locked M never went to sleep"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(r);
        });
    }
}

#[test]
fn a_locked_main_goroutine_that_finishes_returns_its_value() {
    let r = rt(2);
    for round in 0..3 {
        let v = r.block_on(move || {
            gokernel::lock_os_thread();
            let t = tid();
            let hs: Vec<_> = (0..100u64)
                .map(|i| gokernel::spawn(move || i * 2))
                .collect();
            let sum: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
            assert_eq!(tid(), t, "the locked main goroutine moved");
            sum + round
        });
        assert_eq!(v, Ok(9_900 + round));
    }
    // The value arrives just before the main goroutine exits and unlocks.
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.stats().locked_ms != 0 {
        assert!(
            Instant::now() < deadline,
            "the exited main goroutine left its M locked"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_locked_goroutine_that_parks_forever_is_still_reported_as_a_deadlock() {
    for procs in [1, 2] {
        let r = within(
            60,
            "block_on with a deadlocked, locked main goroutine",
            move || {
                let r = rt(procs);
                let d = r.block_on(|| {
                    gokernel::lock_os_thread();
                    gokernel::park();
                });
                // The runtime goes on, with the locked M asleep.
                let v = r.block_on(|| gokernel::spawn(|| 7).join().unwrap());
                (d, v)
            },
        );
        assert!(
            matches!(r, (Err(Deadlock { .. }), Ok(7))),
            "procs = {procs}: {r:?}"
        );
    }
}

#[test]
fn a_locked_goroutine_on_one_proc_round_trips_through_other_ms() {
    let r = rt(1);
    r.block_on(|| {
        gokernel::lock_os_thread();
        let m = current_m_id();
        let others: Vec<_> = (0..10)
            .map(|_| {
                gokernel::spawn(move || {
                    let mut mine = Vec::new();
                    for _ in 0..100 {
                        mine.push(current_m_id());
                        gokernel::gosched();
                    }
                    mine
                })
            })
            .collect();
        for _ in 0..rounds(1_000) {
            gokernel::gosched();
            assert_eq!(current_m_id(), m);
        }
        for o in others {
            let ms = o.join().unwrap();
            assert!(!ms.contains(&m), "another goroutine ran on the locked M");
        }
        assert_eq!(current_m_id(), m);
        gokernel::unlock_os_thread();
    })
    .unwrap();
}

// ---------------------------------------------------------------------
// Timers and locked goroutines: a locked M sleeps in stoplockedm without
// looking at timers, and its P moves by hand-offs (handoffp, startlockedm)
// that do not go through findrunnable. Timers must still fire on time.

/// How late a wake-up may be before a test calls it lost (a noisy machine).
const LATE: Duration = Duration::from_secs(5);

/// Sleeps `d` and checks the wake-up came after the deadline and not
/// `LATE` after it; returns how long it took.
fn sleep_on_time(d: Duration, what: &str) -> Duration {
    let t = Instant::now();
    gokernel::sleep(d);
    let slept = t.elapsed();
    assert!(slept >= d, "{what}: woke after {slept:?}, before its {d:?}");
    assert!(
        slept < d + LATE,
        "{what}: woke after {slept:?} (asked {d:?})"
    );
    slept
}

#[test]
fn a_locked_goroutine_that_sleeps_wakes_after_each_deadline_on_its_own_m_and_thread() {
    for procs in [1, 2] {
        within(60, "a locked goroutine sleeping", move || {
            rt(procs)
                .block_on(move || {
                    // An unlocked sleeper beside it: its timers share the
                    // heaps and the timer sleeper with the locked one's.
                    let stop = Arc::new(AtomicBool::new(false));
                    let s = stop.clone();
                    let peer = gokernel::spawn(move || {
                        while !s.load(Ordering::SeqCst) {
                            sleep_on_time(Duration::from_millis(20), "the unlocked peer");
                        }
                    });
                    gokernel::lock_os_thread();
                    let (m, t) = (current_m_id(), tid());
                    for i in 0..10 {
                        let what = format!("procs {procs}, locked sleep {i}");
                        sleep_on_time(Duration::from_millis(50), &what);
                        assert_eq!(current_m_id(), m, "{what}: woke on another M");
                        assert_eq!(tid(), t, "{what}: woke on another thread");
                    }
                    gokernel::unlock_os_thread();
                    stop.store(true, Ordering::SeqCst);
                    peer.join().unwrap();
                })
                .unwrap();
        });
    }
}

#[test]
fn a_goroutine_sleeps_on_time_while_a_locked_goroutine_parks_and_unparks_over_and_over() {
    // On one P every timer is on that P, which only ever moves by
    // hand-offs between the locked M and the Ms of the wakers.
    for procs in [1, 2] {
        within(60, "sleeping beside a locked ping-pong", move || {
            rt(procs)
                .block_on(move || {
                    let stop = Arc::new(AtomicBool::new(false));
                    let s = stop.clone();
                    let locked = gokernel::spawn_locked(move || {
                        let m = current_m_id();
                        let mut rounds = 0u64;
                        while !s.load(Ordering::SeqCst) {
                            park_and_get_woken();
                            assert_eq!(current_m_id(), m, "the locked goroutine moved");
                            rounds += 1;
                        }
                        rounds
                    });
                    for i in 0..10 {
                        let what = format!("procs {procs}, sleep {i} beside the ping-pong");
                        sleep_on_time(Duration::from_millis(50), &what);
                    }
                    stop.store(true, Ordering::SeqCst);
                    let rounds = locked.join().unwrap();
                    assert!(rounds > 0, "procs {procs}: the locked goroutine never ran");
                })
                .unwrap();
        });
    }
}

/// Starts a goroutine that locks its thread and parks for good, and waits
/// until its M sleeps.
fn park_a_locked_goroutine_for_good() {
    drop(gokernel::spawn_locked(|| {
        gokernel::park(); // nobody unparks it
    }));
    let deadline = Instant::now() + Duration::from_secs(20);
    while gokernel::stats().idle_locked_ms != 1 {
        assert!(
            Instant::now() < deadline,
            "the locked M never went to sleep"
        );
        gokernel::gosched();
    }
}

#[test]
fn a_timer_beside_a_locked_goroutine_parked_for_good_is_no_deadlock_until_it_has_fired() {
    for procs in [1, 2] {
        for main_locked in [false, true] {
            let case = format!("procs {procs}, main goroutine locked: {main_locked}");
            let c = case.clone();
            let (slept, got, parked) = within(60, &case, move || {
                let lock = move || {
                    if main_locked {
                        gokernel::lock_os_thread();
                    }
                };
                let slept = rt(procs).block_on(move || {
                    park_a_locked_goroutine_for_good();
                    lock();
                    sleep_on_time(Duration::from_millis(100), &c)
                });
                let got = rt(procs).block_on(move || {
                    park_a_locked_goroutine_for_good();
                    lock();
                    let t = Instant::now();
                    gokernel::after(Duration::from_millis(100)).recv().unwrap();
                    t.elapsed()
                });
                // The timer fires, then every goroutine is parked for good.
                let t = Instant::now();
                let parked = rt(procs).block_on(move || {
                    park_a_locked_goroutine_for_good();
                    lock();
                    gokernel::sleep(Duration::from_millis(50));
                    gokernel::park();
                });
                (slept, got, (parked, t.elapsed()))
            });
            assert!(slept.is_ok(), "{case}: a sleep was taken for a deadlock");
            let got = got.unwrap_or_else(|_| panic!("{case}: after() was taken for a deadlock"));
            assert!(
                got >= Duration::from_millis(100),
                "{case}: after(100ms) arrived after {got:?}"
            );
            let (parked, after) = parked;
            assert!(
                matches!(parked, Err(Deadlock { .. })),
                "{case}: everything parked for good after the timer was no deadlock"
            );
            assert!(
                after >= Duration::from_millis(50),
                "{case}: a deadlock was reported after {after:?}, with the 50 ms timer pending"
            );
        }
    }
}

#[test]
fn a_locked_goroutine_sleeping_in_step_with_a_goroutine_spinning_for_it_is_never_left_asleep() {
    // The interleaving this catches (procs 2): the main goroutine's timer
    // sleeper wakes, takes the idle P as a spinning M and readies main;
    // meanwhile the locked goroutine sleeps, and its M's handoffp sees that
    // spinning M and puts the P on the idle list without another M being
    // started. The spinning M hands the search on (wakep) before that P is
    // idle, so nobody is left to run the locked goroutine's timer (or the
    // locked goroutine, readied behind main in the spinning M's queue) —
    // and main spins without yielding until it runs. Also: an M idling
    // the last P must not report a deadlock because the timers it looks
    // at were taken off their heaps, a moment after, by an M that took a
    // P to run them (seen under load). Timing-dependent: many short
    // rounds.
    const LOST: Duration = Duration::from_secs(5);
    let n = rounds(2_000) as u64;
    let r = within(
        120,
        "a locked sleeper beside a spinning waiter",
        move || {
            rt(2).block_on(move || {
                let count = Arc::new(AtomicU64::new(0));
                let stop = Arc::new(AtomicBool::new(false));
                let (c, s) = (count.clone(), stop.clone());
                let locked = gokernel::spawn_locked(move || {
                    while !s.load(Ordering::SeqCst) {
                        gokernel::sleep(Duration::from_micros(500));
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                });
                let mut lost = None;
                for i in 0..n {
                    gokernel::sleep(Duration::from_micros(500));
                    let seen = count.load(Ordering::SeqCst);
                    let t = Instant::now();
                    // No yield: only another M can run the locked goroutine.
                    while count.load(Ordering::SeqCst) == seen {
                        if t.elapsed() > LOST {
                            lost = Some((i, gokernel::stats()));
                            break;
                        }
                        std::hint::spin_loop();
                    }
                    if lost.is_some() {
                        break;
                    }
                }
                stop.store(true, Ordering::SeqCst);
                locked.join().unwrap();
                lost
            })
        },
    );
    let lost = r.unwrap_or_else(|_| {
        panic!("a deadlock was reported while both goroutines slept on timers")
    });
    if let Some((i, stats)) = lost {
        panic!(
            "round {i}: the locked goroutine did not run for {LOST:?} while a P was idle; {stats:?}"
        );
    }
}
