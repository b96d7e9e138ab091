//! A goroutine that has started resumes only on the OS thread it first ran
//! on (the default), so thread-local and thread-affine state stays sound;
//! goroutines that have not started yet still spread over the Ps; and the
//! `unsafe` opt-in `Builder::migrate_started_goroutines` gives Go's
//! migration back.
//!
//! The thread-local cases need an optimised build to show the bug they
//! guard against (LLVM keeps a thread-local's address across calls only
//! when optimising); the gate runs this file in release too.

mod common;

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{busy_peers, in_crash_child, run_crash_child, within};
use gokernel::Runtime;

fn tid() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// Runs the test `name` in a child process and asserts it exited cleanly:
/// a regression here is a crash or an abort from the allocator, which
/// must fail the test by name instead of killing the test binary.
fn clean_in_child(name: &str) {
    let c = run_crash_child(name);
    assert!(
        c.code == Some(0),
        "the child ended with code {:?}, signal {:?}; stderr:\n{}",
        c.code,
        c.signal,
        c.stderr
    );
}

thread_local! {
    static BOX_SLOT: Cell<Option<Box<u64>>> = const { Cell::new(None) };
    static LOG: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Yields, then takes the thread's box out and puts it back 50 times: the
/// thread-local's address is computed once for the whole function.
#[inline(never)]
fn churn_the_thread_local_box(rounds: u32) {
    for _ in 0..rounds {
        gokernel::gosched();
        for _ in 0..50 {
            let b = BOX_SLOT.with(|s| s.take()).unwrap_or_else(|| Box::new(7));
            black_box(&b);
            BOX_SLOT.with(|s| s.set(Some(b)));
        }
    }
}

#[test]
fn a_thread_local_box_taken_and_put_back_across_yields_is_never_freed_twice() {
    if !in_crash_child() {
        return clean_in_child(
            "a_thread_local_box_taken_and_put_back_across_yields_is_never_freed_twice",
        );
    }
    for _ in 0..5 {
        let rt = Runtime::builder().procs(2).build().unwrap();
        rt.block_on(|| {
            let hs: Vec<_> = (0..8)
                .map(|_| gokernel::spawn(|| churn_the_thread_local_box(2_000)))
                .collect();
            for h in hs {
                h.join().unwrap();
            }
        })
        .unwrap();
    }
}

/// Logs `id` in the thread's `RefCell`, yields, and expects to find it
/// there again: borrows never span a switch.
#[inline(never)]
fn log_yield_and_find(id: u64, rounds: u32) -> u32 {
    let mut missing = 0;
    for _ in 0..rounds {
        LOG.with(|l| l.borrow_mut().push(id));
        gokernel::gosched();
        LOG.with(|l| {
            let mut l = l.borrow_mut();
            match l.iter().position(|&x| x == id) {
                Some(i) => {
                    l.swap_remove(i);
                }
                None => missing += 1,
            }
        });
    }
    missing
}

#[test]
fn a_thread_local_refcell_borrowed_between_switches_sees_its_own_thread_values() {
    if !in_crash_child() {
        return clean_in_child(
            "a_thread_local_refcell_borrowed_between_switches_sees_its_own_thread_values",
        );
    }
    let rt = Runtime::builder().procs(2).build().unwrap();
    let missing = rt
        .block_on(|| {
            let hs: Vec<_> = (0..8u64)
                .map(|id| gokernel::spawn(move || log_yield_and_find(id, 5_000)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum::<u32>()
        })
        .unwrap();
    assert_eq!(
        missing, 0,
        "a value logged in the thread's RefCell was gone after a yield"
    );
}

/// Sleeps in its destructor: a panic's unwind parks halfway.
struct SleepsWhileUnwinding;

impl Drop for SleepsWhileUnwinding {
    fn drop(&mut self) {
        gokernel::sleep(Duration::from_micros(200));
    }
}

#[test]
fn a_panic_that_parks_while_unwinding_leaves_every_threads_panic_count_right() {
    if !in_crash_child() {
        return clean_in_child(
            "a_panic_that_parks_while_unwinding_leaves_every_threads_panic_count_right",
        );
    }
    // Quiet: the panics below are expected.
    std::panic::set_hook(Box::new(|_| {}));
    let rt = Runtime::builder().procs(2).build().unwrap();
    let (lying, poisoned) = rt
        .block_on(|| {
            let hs: Vec<_> = (0..16)
                .map(|_| {
                    gokernel::spawn(|| {
                        for _ in 0..20 {
                            let r = gokernel::spawn(|| {
                                let _s = SleepsWhileUnwinding;
                                panic!("expected");
                            })
                            .join();
                            assert!(r.is_err());
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            // Now one panic stays in flight, parked in its destructor on
            // thread `tp`: std then asks each thread for its own count, so
            // a thread other than `tp` says it is panicking only if an
            // earlier unwind left its count wrong.
            let release = Arc::new(AtomicBool::new(false));
            let rx = gokernel::chan::<i64>(1);
            let tx = rx.clone();
            let rel = release.clone();
            let inflight = gokernel::spawn(move || {
                struct ParksUntilReleased(Arc<AtomicBool>, gokernel::Chan<i64>);
                impl Drop for ParksUntilReleased {
                    fn drop(&mut self) {
                        self.1.send(tid()).unwrap();
                        while !self.0.load(Ordering::SeqCst) {
                            gokernel::sleep(Duration::from_micros(100));
                        }
                    }
                }
                let _p = ParksUntilReleased(rel, tx);
                panic!("expected, in flight");
            });
            let tp = rx.recv().unwrap();
            let lying = Arc::new(AtomicU32::new(0));
            let m = Arc::new(Mutex::new(0u32));
            let hs: Vec<_> = (0..16)
                .map(|_| {
                    let (lying, m) = (lying.clone(), m.clone());
                    gokernel::spawn(move || {
                        for _ in 0..50 {
                            if tid() != tp {
                                if std::thread::panicking() {
                                    lying.fetch_add(1, Ordering::Relaxed);
                                }
                                if let Ok(mut g) = m.lock() {
                                    *g += 1;
                                }
                            }
                            gokernel::gosched();
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            release.store(true, Ordering::SeqCst);
            assert!(inflight.join().is_err());
            (lying.load(Ordering::Relaxed), m.is_poisoned())
        })
        .unwrap();
    assert_eq!(
        lying, 0,
        "thread::panicking() was true on a thread with no panic in flight"
    );
    assert!(!poisoned, "a std Mutex was poisoned without a panic");
}

#[test]
fn a_stdout_lock_held_across_a_sleep_excludes_a_goroutine_of_another_thread() {
    // StdoutLock is a reentrant lock keyed by thread: goroutines of one
    // thread share it (that cannot be helped), but a goroutine of another
    // thread must wait until the holder lets go, and the holder must let
    // go on the thread that took it. Two goroutines, on two threads for
    // sure (each spins until both run), take turns holding it across a
    // sleep. (Only one thread ever blocks on the lock: a thread blocked
    // there keeps its P, so more contenders than Ps could leave the
    // holder without a P to wake up on.)
    if !in_crash_child() {
        return clean_in_child(
            "a_stdout_lock_held_across_a_sleep_excludes_a_goroutine_of_another_thread",
        );
    }
    let holder = Arc::new(AtomicU64::new(0)); // the tid inside, or 0
    let overlaps = Arc::new(AtomicU32::new(0));
    let moved = Arc::new(AtomicU32::new(0));
    let (h2, o2, m2) = (holder.clone(), overlaps.clone(), moved.clone());
    within(
        60,
        "two goroutines holding StdoutLock across sleeps",
        move || {
            let rt = Runtime::builder().procs(2).build().unwrap();
            rt.block_on(move || {
                let running = Arc::new(AtomicU32::new(0));
                let hs: Vec<_> = (0..2u32)
                    .map(|i| {
                        let (holder, overlaps, moved) = (h2.clone(), o2.clone(), m2.clone());
                        let running = running.clone();
                        gokernel::spawn(move || {
                            use std::io::Write;
                            running.fetch_add(1, Ordering::SeqCst);
                            while running.load(Ordering::SeqCst) < 2 {
                                std::hint::spin_loop();
                            }
                            for round in 0..20 {
                                // Out of step: one holds it across its
                                // sleep while the other, back from a
                                // shorter one, waits for it.
                                if round % 2 != i {
                                    gokernel::sleep(Duration::from_micros(200));
                                }
                                let mut out = std::io::stdout().lock();
                                let me = tid() as u64;
                                if holder.swap(me, Ordering::SeqCst) != 0 {
                                    overlaps.fetch_add(1, Ordering::SeqCst);
                                }
                                gokernel::sleep(Duration::from_millis(1));
                                out.write_all(b"").unwrap();
                                if tid() as u64 != me {
                                    moved.fetch_add(1, Ordering::SeqCst);
                                }
                                holder.store(0, Ordering::SeqCst);
                                drop(out);
                            }
                        })
                    })
                    .collect();
                for h in hs {
                    h.join().unwrap();
                }
            })
            .unwrap();
        },
    );
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two threads held the StdoutLock at once"
    );
    assert_eq!(
        moved.load(Ordering::SeqCst),
        0,
        "a StdoutLock was let go on another thread than the one that took it"
    );
}

/// Counts, over yields, parks and sleeps, how often a goroutine found
/// itself on another OS thread than before.
fn thread_changes(rt: &Runtime, rounds: u32) -> u64 {
    let changes = Arc::new(AtomicU64::new(0));
    let c = changes.clone();
    rt.block_on(move || {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let c = c.clone();
                gokernel::spawn(move || {
                    let mut t = tid();
                    for r in 0..rounds {
                        match (i + r) % 3 {
                            0 => gokernel::gosched(),
                            1 => {
                                let me = gokernel::current();
                                gokernel::go(move || me.unpark());
                                gokernel::park();
                            }
                            _ => gokernel::sleep(Duration::from_micros(50)),
                        }
                        let now = tid();
                        if now != t {
                            c.fetch_add(1, Ordering::Relaxed);
                            t = now;
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    })
    .unwrap();
    changes.load(Ordering::Relaxed)
}

#[test]
fn started_goroutines_never_change_threads_by_default() {
    for procs in [1, 2, 4] {
        let rt = Runtime::builder().procs(procs).build().unwrap();
        let n = thread_changes(&rt, 3_000);
        assert_eq!(
            n, 0,
            "procs {procs}: {n} thread changes of started goroutines"
        );
    }
}

#[test]
fn with_the_migration_opt_in_started_goroutines_do_change_threads() {
    // SAFETY: these goroutines hold no thread-local or thread-affine state
    // across a switch (tid() is a system call, read afresh each time).
    let rt = unsafe { Runtime::builder().procs(2).migrate_started_goroutines() }
        .build()
        .unwrap();
    // A move needs the other thread to be free at the right moment: keep
    // going until one is seen (bounded by time, not by a count).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut total = 0;
    while total == 0 {
        assert!(
            Instant::now() < deadline,
            "no started goroutine changed threads in 20 s with migration on"
        );
        total += thread_changes(&rt, 1_000);
    }
}

#[test]
fn goroutines_that_have_not_started_are_taken_by_an_idle_thread() {
    // Two goroutines that spin (never yielding) until both run: only
    // possible if the second, not yet started, is stolen by the other P.
    within(60, "two spinning goroutines on 2 Ps", || {
        let rt = Runtime::builder().procs(2).build().unwrap();
        rt.block_on(|| {
            let running = Arc::new(AtomicU32::new(0));
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    let running = running.clone();
                    gokernel::spawn(move || {
                        running.fetch_add(1, Ordering::SeqCst);
                        while running.load(Ordering::SeqCst) < 2 {
                            std::hint::spin_loop();
                        }
                        tid()
                    })
                })
                .collect();
            let t: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
            assert_ne!(t[0], t[1], "both ran on one thread");
        })
        .unwrap();
    });
}

#[test]
fn a_goroutine_woken_from_another_thread_resumes_on_its_own() {
    // Wakers on plain threads and on goroutines of other threads: the
    // woken goroutine always comes back to its thread.
    let rt = Runtime::builder().procs(2).build().unwrap();
    rt.block_on(|| {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = busy_peers(3, &stop);
        let t = tid();
        for i in 0..2_000 {
            let me = gokernel::current();
            if i % 2 == 0 {
                std::thread::spawn(move || me.unpark());
            } else {
                gokernel::go(move || me.unpark());
            }
            gokernel::park();
            assert_eq!(tid(), t, "woken on another thread at round {i}");
        }
        stop.store(true, Ordering::Relaxed);
        for p in peers {
            p.join().unwrap();
        }
    })
    .unwrap();
}

#[test]
fn a_locked_goroutines_neighbours_wait_for_the_unlock_and_then_run_on_their_thread() {
    within(60, "neighbours of a locked goroutine", || {
        // One P: the neighbour starts on the main goroutine's thread when
        // main parks (with two, an idle thread could take it first).
        let rt = Runtime::builder().procs(1).build().unwrap();
        rt.block_on(|| {
            let t = tid();
            // A neighbour: started here, so bound to this thread.
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            let handle = gokernel::chan::<(gokernel::Goroutine, i64)>(1);
            let hc = handle.clone();
            let neighbour = gokernel::spawn(move || {
                hc.send((gokernel::current(), tid())).unwrap();
                gokernel::park(); // until the main goroutine unparks it
                r.store(true, Ordering::SeqCst);
                tid()
            });
            let (h, started_on) = handle.recv().unwrap();
            assert_eq!(started_on, t, "the neighbour started on another thread");
            gokernel::lock_os_thread();
            // Ready the neighbour, then let time pass: while locked, it
            // must not run on this thread, and cannot run elsewhere.
            h.unpark();
            for _ in 0..20 {
                gokernel::sleep(Duration::from_millis(1));
                assert!(!ran.load(Ordering::SeqCst), "a neighbour ran while locked");
            }
            assert_eq!(tid(), t);
            gokernel::unlock_os_thread();
            assert_eq!(neighbour.join().unwrap(), t, "the neighbour moved");
        })
        .unwrap();
    });
}

#[test]
fn spawn_locked_runs_on_a_thread_no_other_goroutine_uses() {
    let rt = Runtime::builder().procs(2).build().unwrap();
    rt.block_on(|| {
        let others = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let peers: Vec<_> = (0..4)
            .map(|_| {
                let (others, stop) = (others.clone(), stop.clone());
                gokernel::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        others.lock().unwrap().push(tid());
                        gokernel::gosched();
                    }
                })
            })
            .collect();
        let main = tid();
        let locked = rt_spawn_locked_rounds(200);
        stop.store(true, Ordering::SeqCst);
        for p in peers {
            p.join().unwrap();
        }
        assert_ne!(locked, main);
        assert!(
            !others.lock().unwrap().contains(&locked),
            "another goroutine ran on the locked goroutine's thread"
        );
    })
    .unwrap();
}

/// A goroutine started with spawn_locked that parks and yields `n` times,
/// checking it stays on one thread; returns that thread.
fn rt_spawn_locked_rounds(n: u32) -> i64 {
    gokernel::spawn_locked(move || {
        let t = tid();
        for _ in 0..n {
            gokernel::gosched();
            let me = gokernel::current();
            gokernel::go(move || me.unpark());
            gokernel::park();
            assert_eq!(tid(), t, "a locked goroutine moved");
        }
        t
    })
    .join()
    .unwrap()
}
