//! Dropping a runtime while goroutines are parked or runnable: every
//! goroutine that started is unwound on its own thread (each destructor
//! runs once, locks are released, no stack is freed under a live frame),
//! the others are dropped unrun, and their handles say the runtime was
//! dropped.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{assert_aborted_with, in_crash_child, run_child_ok, run_crash_child, within};
use gokernel::{Runtime, RuntimeDropped, chan};

/// Counts its drops.
struct Counted(Arc<AtomicU32>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn rt(procs: usize) -> Runtime {
    Runtime::builder().procs(procs).build().unwrap()
}

fn tid() -> i64 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// Waits until `n` goroutines of `rt` are parked.
fn wait_parked(rt: &Runtime, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt.stats().goroutines.waiting < n {
        assert!(Instant::now() < deadline, "{n} goroutines never parked");
        std::thread::yield_now();
    }
}

#[test]
fn values_held_by_parked_senders_and_receivers_are_dropped_exactly_once() {
    for procs in [1, 2] {
        let drops = Arc::new(AtomicU32::new(0));
        let r = rt(procs);
        let (to_nobody, from_nobody) = (chan::<Counted>(0), chan::<Counted>(0));
        for _ in 0..10 {
            let (c, d) = (to_nobody.clone(), drops.clone());
            // Parks in send, the value in its frame.
            drop(r.spawn(move || c.send(Counted(d))));
            let (c, d) = (from_nobody.clone(), drops.clone());
            // Parks in recv, holding a value of its own meanwhile.
            drop(r.spawn(move || {
                let _mine = Counted(d);
                c.recv()
            }));
        }
        wait_parked(&r, 20);
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        within(60, "dropping the runtime", move || drop(r));
        assert_eq!(
            drops.load(Ordering::SeqCst),
            20,
            "procs {procs}: values held by parked goroutines were not dropped exactly once"
        );
        // The channels are still usable and have nobody waiting on them.
        assert!(to_nobody.try_recv().is_err());
        assert!(
            from_nobody
                .try_send(Counted(Arc::new(AtomicU32::new(0))))
                .is_err()
        );
    }
}

#[test]
fn a_mutex_held_by_a_parked_goroutine_is_released_when_its_runtime_is_dropped() {
    let m = Arc::new(gokernel::sync::Mutex::new(0u32));
    let r = rt(2);
    let m2 = m.clone();
    let locked = Arc::new(AtomicBool::new(false));
    let l = locked.clone();
    drop(r.spawn(move || {
        let mut g = m2.lock();
        *g += 1;
        l.store(true, Ordering::SeqCst);
        gokernel::park(); // for good, holding the lock
    }));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !locked.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the goroutine never took the lock"
        );
        std::thread::yield_now();
    }
    wait_parked(&r, 1);
    within(60, "dropping the runtime", move || drop(r));
    // A plain thread can take it now.
    let v = within(20, "locking the released mutex", move || *m.lock());
    assert_eq!(v, 1);
}

#[test]
fn a_goroutine_woken_in_a_select_but_not_run_leaves_no_entry_on_the_other_channel() {
    for _ in 0..20 {
        let r = rt(1);
        let (a, b) = (chan::<u32>(0), chan::<u32>(0));
        let (a2, b2) = (a.clone(), b.clone());
        drop(r.spawn(move || {
            gokernel::select! {
                recv(a2) -> v => v.ok(),
                recv(b2) -> v => v.ok(),
            }
        }));
        wait_parked(&r, 1);
        // The only P spins until told, so the selector, once woken, waits.
        let (stop, _spinner) = common::spin_the_only_p(&r);
        a.send(1).unwrap(); // wakes the selector; it cannot run yet
        stop.store(true, Ordering::SeqCst);
        within(60, "dropping the runtime", move || drop(r));
        // Its sudog on b is gone: this finds no receiver (and reads no
        // freed stack).
        assert!(b.try_send(2).is_err());
    }
}

#[test]
fn join_reports_runtime_dropped_for_goroutines_that_never_finished_or_never_started() {
    let r = rt(1);
    let parked = r.spawn(gokernel::park);
    wait_parked(&r, 1);
    // Spawned from outside with the only P busy: never starts.
    // The spinner ends once the drop has begun.
    let spinner = common::spin_the_only_p_until_shutdown(&r);
    let never = r.spawn(|| 5);
    within(60, "dropping the runtime", move || drop(r));
    assert!(spinner.join().is_ok(), "the spinner finished normally");
    for (what, h) in [
        ("parked", parked.join().map(|_| 0)),
        ("never started", never.join()),
    ] {
        let e = h.expect_err(what);
        assert!(
            e.downcast_ref::<RuntimeDropped>().is_some(),
            "{what}: the error is not RuntimeDropped"
        );
    }
}

#[test]
fn goroutines_are_unwound_on_the_thread_they_ran_on() {
    struct NotesThread(i64, Arc<AtomicI64>);
    impl Drop for NotesThread {
        fn drop(&mut self) {
            if tid() != self.0 {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let moved = Arc::new(AtomicI64::new(0));
    let r = rt(2);
    for i in 0..16 {
        let m = moved.clone();
        drop(r.spawn(move || {
            let _n = NotesThread(tid(), m);
            if i % 2 == 0 {
                gokernel::park();
            } else {
                gokernel::sleep(Duration::from_secs(3600));
            }
        }));
    }
    wait_parked(&r, 16);
    within(60, "dropping the runtime", move || drop(r));
    assert_eq!(
        moved.load(Ordering::SeqCst),
        0,
        "a goroutine was unwound on another thread"
    );
}

#[test]
fn a_goroutine_parked_inside_a_thread_scope_is_unwound_after_its_scoped_thread_ends() {
    // The scoped thread writes into the goroutine's stack until the scope
    // closure's guard, dropped by the unwinding, tells it to stop; std's
    // scope then waits for it before the frame goes away.
    let writes = Arc::new(AtomicU32::new(0));
    let w = writes.clone();
    let r = rt(1);
    drop(r.spawn(move || {
        let mut on_stack = [0u64; 64];
        let stop = AtomicBool::new(false);
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        std::thread::scope(|s| {
            let stop = &stop;
            let slot = &mut on_stack;
            let w = &w;
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    slot[7] = slot[7].wrapping_add(1);
                    w.fetch_add(1, Ordering::SeqCst);
                    std::thread::yield_now();
                }
            });
            let _stop = Stop(stop);
            gokernel::park(); // for good: the drop unwinds from here
        });
    }));
    wait_parked(&r, 1);
    within(60, "dropping the runtime", move || drop(r));
    let n = writes.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        writes.load(Ordering::SeqCst),
        n,
        "the scoped thread outlived the drop"
    );
}

#[test]
fn a_runtime_dropped_from_its_own_goroutine_does_not_hang() {
    let r = Arc::new(std::sync::Mutex::new(Some(rt(2))));
    let r2 = r.clone();
    let h = within(60, "a runtime dropping itself", move || {
        let guard = r2.lock().unwrap();
        let h = guard.as_ref().unwrap().spawn(move || {
            let rt = r.lock().unwrap().take().unwrap();
            drop(rt); // returns at once; the shutdown goes on elsewhere
            7
        });
        drop(guard);
        h
    });
    let v = within(
        60,
        "joining the goroutine that dropped its runtime",
        move || h.join(),
    );
    assert_eq!(v.ok(), Some(7), "it finished before its next park");
}

/// Unlocks its goroutine's thread if `unlock`, yields, then counts its
/// drop in `finished` (and drops that came back on another thread in
/// `moved`): a destructor that reaches a scheduling point while its
/// goroutine is being unwound.
struct YieldThenCount {
    unlock: bool,
    finished: Arc<AtomicU32>,
    moved: Arc<AtomicU32>,
}

impl Drop for YieldThenCount {
    fn drop(&mut self) {
        let before = tid();
        if self.unlock {
            gokernel::unlock_os_thread();
        }
        gokernel::gosched();
        if tid() != before {
            self.moved.fetch_add(1, Ordering::SeqCst);
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// Three goroutines of `r` (each locked to its thread first if `lock`)
/// park for good holding a [`YieldThenCount`] (unlocking if `lock`);
/// `r` is dropped. Returns how many destructors finished, and how many
/// came back from their yield on another thread.
fn drop_with_three_yielding_destructors(r: Runtime, lock: bool) -> (u32, u32) {
    let finished = Arc::new(AtomicU32::new(0));
    let moved = Arc::new(AtomicU32::new(0));
    let c = chan::<u32>(0);
    for _ in 0..3 {
        let (finished, moved, c) = (finished.clone(), moved.clone(), c.clone());
        drop(r.spawn(move || {
            if lock {
                gokernel::lock_os_thread();
            }
            let _d = YieldThenCount {
                unlock: lock,
                finished,
                moved,
            };
            let _ = c.recv(); // nobody sends
        }));
    }
    wait_parked(&r, 3);
    drop(r);
    (
        finished.load(Ordering::SeqCst),
        moved.load(Ordering::SeqCst),
    )
}

#[test]
fn destructors_that_yield_while_their_runtime_is_dropped_run_to_their_end() {
    // The first goroutine unwound yields in the middle of its unwinding,
    // which leaves its thread counting as panicking; the M must resume it
    // (that starts no new unwind) and then unwind the others as well.
    for (procs, migrate) in [(1, false), (2, false), (2, true)] {
        let r = if migrate {
            // SAFETY: the goroutines hold no thread-local state across a
            // switch (the unwinding's own, std's panic count, is the
            // runtime's to keep: it binds a goroutine it unwinds).
            unsafe { Runtime::builder().procs(procs).migrate_started_goroutines() }
                .build()
                .unwrap()
        } else {
            rt(procs)
        };
        let (finished, moved) = drop_with_three_yielding_destructors(r, false);
        assert_eq!(
            finished, 3,
            "destructors that yielded ran to their end ({procs} procs, migrate {migrate})"
        );
        assert_eq!(
            moved, 0,
            "a goroutine being unwound came back from a yield on another thread ({procs} procs, migrate {migrate})"
        );
    }
}

#[test]
fn a_destructor_that_blocks_while_its_runtime_is_dropped_is_a_named_fatal_error() {
    if in_crash_child() {
        struct RecvOnDrop(gokernel::Chan<u32>);
        impl Drop for RecvOnDrop {
            fn drop(&mut self) {
                let _ = self.0.recv(); // nobody sends
            }
        }
        let r = rt(1);
        let c = chan::<u32>(0);
        drop(r.spawn(move || {
            let _d = RecvOnDrop(c);
            gokernel::park();
        }));
        wait_parked(&r, 1);
        drop(r);
        unreachable!("the blocking destructor was not noticed");
    }
    let c = run_crash_child(
        "a_destructor_that_blocks_while_its_runtime_is_dropped_is_a_named_fatal_error",
    );
    assert_aborted_with(
        &c,
        &[
            "fatal error: a goroutine parked while it was being unwound because its runtime was dropped",
            "goroutine ",
        ],
    );
}

#[test]
fn shutting_down_is_false_outside_goroutines_and_in_a_live_runtime_and_true_once_its_drop_began() {
    assert!(!gokernel::shutting_down(), "a plain thread");
    let r = rt(1);
    let h = r.spawn(gokernel::shutting_down);
    assert_eq!(h.join().ok(), Some(false), "a live runtime");
    // The spinner returns only once it sees the drop: if it never did,
    // the drop would wait for it for good and `within` would fail.
    let spinner = common::spin_the_only_p_until_shutdown(&r);
    within(60, "dropping the runtime", move || drop(r));
    assert!(spinner.join().is_ok(), "the spinner returned by itself");
}

#[test]
fn a_panicking_destructor_of_an_unstarted_goroutine_leaves_no_channel_queue_pointing_at_a_freed_goroutine()
 {
    // A goroutine parked in the middle of unwinding a panic (a destructor
    // that waits on a channel) makes its thread count as panicking: the
    // teardown leaks it, its sudog still on the channel's queue, which
    // must never lead to freed memory, even when the closure of a
    // goroutine that never started panics as it is dropped. (Before: the panic skipped the unlinking of the Gs
    // after it, their slab was freed, and the next send on the channel
    // read the freed G: a segmentation fault. Now the scheduler of a
    // goroutine left parked is kept.) In a child: the panics leave
    // threads behind.
    if in_crash_child() {
        struct RecvOnDrop(gokernel::Chan<u32>);
        impl Drop for RecvOnDrop {
            fn drop(&mut self) {
                let _ = self.0.recv(); // nobody sends until the runtime is gone
            }
        }
        struct PanicOnDrop;
        impl Drop for PanicOnDrop {
            fn drop(&mut self) {
                panic!("the closure of a goroutine that never ran panics as it is dropped");
            }
        }
        let r = rt(1);
        // A G that finishes: its place in the list of Gs comes first and
        // is reused below.
        r.spawn(|| ()).join().unwrap();
        let c = chan::<u32>(0);
        let c1 = c.clone();
        drop(r.spawn(move || {
            let _d = RecvOnDrop(c1);
            panic!("a goroutine panics; its destructor parks on a channel");
        }));
        wait_parked(&r, 1);
        // A goroutine that never starts (the only P stays busy until the
        // drop), whose closure panics as it is dropped, and counts that.
        let spawned = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU32::new(0));
        let (s, d) = (spawned.clone(), dropped.clone());
        drop(r.spawn(move || {
            let (p, n) = (PanicOnDrop, Counted(d));
            gokernel::go(move || drop((p, n)));
            s.store(true, Ordering::SeqCst);
            while !gokernel::shutting_down() {
                std::hint::spin_loop();
            }
        }));
        while !spawned.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // The parked goroutine is left parked (its thread counts as
        // panicking), so the scheduler is kept; the unstarted goroutine's
        // closure is dropped by the drop, whose panic comes out here.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(r)));
        assert!(r.is_err(), "the closure's panic came out of the drop");
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "the closure was dropped");
        // Nobody receives any more: the parked goroutine's runtime is
        // stopped, its sudog skipped.
        assert!(matches!(
            c.try_send(7),
            Err(gokernel::TrySendError::Full(7))
        ));
        return;
    }
    run_child_ok(
        "a_panicking_destructor_of_an_unstarted_goroutine_leaves_no_channel_queue_pointing_at_a_freed_goroutine",
    );
}

#[test]
fn a_runtime_dropped_on_its_own_threads_system_stack_does_not_hang() {
    // A `systemstack` closure and an `after_func` callback run on an M's
    // own stack: the drop there cannot wait for that M's thread either.
    for on_timer in [false, true] {
        let r = Arc::new(std::sync::Mutex::new(Some(rt(2))));
        let r2 = r.clone();
        let h = within(
            60,
            "spawning the goroutine that drops its runtime",
            move || {
                let guard = r2.lock().unwrap();
                let h = guard.as_ref().unwrap().spawn(move || {
                    let rt = r.lock().unwrap().take().unwrap();
                    if on_timer {
                        gokernel::time::after_func(Duration::ZERO, move || drop(rt));
                    } else {
                        gokernel::systemstack(move || drop(rt));
                    }
                    gokernel::park(); // unwound by the shutdown
                });
                drop(guard);
                h
            },
        );
        let v = within(60, "the drop on an M's own stack", move || h.join());
        assert!(
            v.unwrap_err().is::<RuntimeDropped>(),
            "unwound at its park (on timer: {on_timer})"
        );
    }
}

#[test]
fn a_goroutine_unwound_beside_a_locked_goroutine_leaves_that_lock_alone() {
    // On one P, a goroutine starts on the thread, then another starts
    // there and locks it: the first waits for the unlock. The teardown
    // resumes both on that thread, the neighbour first; its lock and
    // unlock must not take over, or undo, the locked goroutine's lock
    // (before: a debug assertion in the scheduler's unlock, then an
    // abort when the neighbour exited). In a child: that abort.
    if in_crash_child() {
        for op in [gokernel::lock_os_thread, gokernel::unlock_os_thread] {
            let r = rt(1);
            let started = Arc::new(AtomicBool::new(false));
            let seen = Arc::new(AtomicI64::new(-1));
            let (s, n) = (started.clone(), seen.clone());
            let neighbour = r.spawn(move || {
                s.store(true, Ordering::SeqCst);
                while !gokernel::shutting_down() {
                    gokernel::gosched();
                }
                op();
                n.store(gokernel::stats().locked_ms as i64, Ordering::SeqCst);
                gokernel::unlock_os_thread();
                gokernel::park(); // unwound here
            });
            while !started.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            let locked = r.spawn(|| {
                gokernel::lock_os_thread();
                gokernel::park();
            });
            while r.stats().locked_ms == 0 || r.stats().goroutines.waiting == 0 {
                std::thread::yield_now();
            }
            drop(r);
            assert_eq!(
                seen.load(Ordering::SeqCst),
                1,
                "the other goroutine's lock held"
            );
            for h in [neighbour, locked] {
                assert!(h.join().unwrap_err().is::<RuntimeDropped>());
            }
        }
        return;
    }
    run_child_ok("a_goroutine_unwound_beside_a_locked_goroutine_leaves_that_lock_alone");
}

#[test]
fn a_locked_goroutine_that_unlocks_while_being_unwound_stays_on_its_thread_with_migration() {
    // Unlocking frees a goroutine to move under migration; not one that
    // its runtime's drop is unwinding: the unwinding is its thread's (std
    // counts it there), so it must finish there.
    for _ in 0..10 {
        // SAFETY: the goroutines hold no thread-local state across a
        // switch (the unwinding's own is the runtime's to keep).
        let r = unsafe { Runtime::builder().procs(2).migrate_started_goroutines() }
            .build()
            .unwrap();
        let (finished, moved) = drop_with_three_yielding_destructors(r, true);
        assert_eq!(finished, 3, "every destructor ran to its end");
        assert_eq!(
            moved, 0,
            "a goroutine being unwound came back from a yield on another thread"
        );
    }
}

#[test]
fn a_socket_closed_after_its_runtime_was_dropped_wakes_no_goroutine_left_parked_on_it() {
    // A goroutine parked on a socket read in a destructor in the middle of
    // a panic is left parked by the teardown (its thread counts as
    // panicking; a build without unwinding leaves every parked goroutine
    // so). Closing the socket through another handle afterwards reads
    // the goroutine through its poll descriptor: before, a goroutine the
    // scheduler's drop had freed (a segmentation fault); now the
    // scheduler is kept, stopped. In a child: the panic leaves a thread
    // behind.
    if in_crash_child() {
        use gokernel::net::{TcpListener, TcpStream};
        use std::io::Read;
        struct ReadOnDrop(TcpStream);
        impl Drop for ReadOnDrop {
            fn drop(&mut self) {
                let _ = (&self.0).read(&mut [0u8; 8]); // nothing comes
            }
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mine, _) = l.accept().unwrap();
        let theirs = mine.try_clone().unwrap();
        let r = rt(1);
        drop(r.spawn(move || {
            let _d = ReadOnDrop(theirs);
            panic!("a goroutine panics; its destructor parks on a socket read");
        }));
        wait_parked(&r, 1);
        drop(r);
        // Until its threads are gone, one of them may hold the scheduler.
        let deadline = Instant::now() + Duration::from_secs(20);
        while common::m_threads() != 0 {
            assert!(
                Instant::now() < deadline,
                "the runtime's threads never ended"
            );
            std::thread::yield_now();
        }
        mine.close(); // wakes nobody: that goroutine's runtime is gone
        drop(peer);
        return;
    }
    run_child_ok(
        "a_socket_closed_after_its_runtime_was_dropped_wakes_no_goroutine_left_parked_on_it",
    );
}

#[test]
fn a_goroutine_that_catches_its_teardown_unwinding_is_unwound_again_at_its_next_park() {
    let r = rt(1);
    let came_back = Arc::new(AtomicBool::new(false));
    let c = came_back.clone();
    let h = r.spawn(move || {
        let caught = std::panic::catch_unwind(gokernel::park);
        assert!(caught.unwrap_err().is::<RuntimeDropped>());
        gokernel::park(); // unwinds again
        c.store(true, Ordering::SeqCst);
    });
    wait_parked(&r, 1);
    drop(r);
    assert!(h.join().unwrap_err().is::<RuntimeDropped>());
    assert!(
        !came_back.load(Ordering::SeqCst),
        "its second park returned"
    );
}

#[test]
fn goroutines_that_yield_while_their_runtime_is_dropped_run_on_one_thread_at_a_time_with_migration()
{
    // With migration the teardown shares unbound goroutines out among its
    // threads by a claim on their status; a goroutine it resumed runs on
    // to its next park, and each yield on the way made it runnable again
    // before its thread had switched it out (and each resume made it
    // runnable before its thread ran it): another thread claimed it then
    // and ran it too (before: an assertion on its status in a debug
    // build, a fatal 'g.m is null' or SIGSEGV in release). In every other
    // round they lock and unlock their thread at each yield: the unlock
    // must not unbind them then either. In a child: that crash.
    if in_crash_child() {
        for round in 0..8 {
            // SAFETY: the goroutines hold no thread-local state across a
            // switch.
            let r = unsafe { Runtime::builder().procs(2).migrate_started_goroutines() }
                .build()
                .unwrap();
            let dropped = Arc::new(AtomicU32::new(0));
            let c = chan::<Counted>(0);
            let mut hs = Vec::new();
            for _ in 0..2 {
                let (c, d) = (c.clone(), dropped.clone());
                hs.push(r.spawn(move || {
                    let _held = Counted(d);
                    let _ = c.recv(); // parked: resumed by the teardown
                }));
            }
            for _ in 0..4 {
                let d = dropped.clone();
                hs.push(r.spawn(move || {
                    let _held = Counted(d);
                    while !gokernel::shutting_down() {
                        gokernel::gosched();
                    }
                    // Resumed by the teardown at a yield: it runs on, and
                    // every yield is a window for a second thread.
                    for _ in 0..20_000 {
                        if round % 2 == 1 {
                            gokernel::lock_os_thread();
                            gokernel::unlock_os_thread();
                        }
                        gokernel::gosched();
                    }
                    gokernel::park(); // unwound here
                }));
            }
            wait_parked(&r, 2);
            drop(r);
            assert_eq!(
                dropped.load(Ordering::SeqCst),
                6,
                "each destructor ran once"
            );
            for h in hs {
                assert!(h.join().unwrap_err().is::<RuntimeDropped>());
            }
        }
        return;
    }
    run_child_ok(
        "goroutines_that_yield_while_their_runtime_is_dropped_run_on_one_thread_at_a_time_with_migration",
    );
}
