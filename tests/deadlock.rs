//! Deadlock: when every goroutine is parked and nothing can wake them,
//! `block_on` returns "all goroutines are asleep - deadlock!" instead of
//! hanging.

use std::sync::{Arc, mpsc};
use std::time::Duration;

use gokernel::{Deadlock, Runtime, WaitReason};

/// Runs `f` on a thread; fails the test if it takes over 60 s (a missed
/// deadlock would hang).
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(60))
        .expect("block_on hung instead of reporting the deadlock")
}

#[test]
fn a_main_goroutine_that_parks_forever_is_reported_as_a_deadlock() {
    for procs in [1, 2] {
        let r = within_a_minute(move || {
            let rt = Runtime::builder().procs(procs).build().unwrap();
            rt.block_on(gokernel::park)
        });
        let d = r.unwrap_err();
        let text = d.to_string();
        assert!(
            text.starts_with("all goroutines are asleep - deadlock!\n\ngoroutine "),
            "procs = {procs}: {text}"
        );
        assert_eq!(d.goroutines().len(), 1, "procs = {procs}: {text}");
        assert_eq!(
            d.goroutines()[0].wait_reason,
            Some(WaitReason::Park),
            "{text}"
        );
    }
}

#[test]
fn goroutines_waiting_on_each_other_are_reported_as_a_deadlock() {
    for procs in [1, 2] {
        let r = within_a_minute(move || {
            let rt = Runtime::builder().procs(procs).build().unwrap();
            rt.block_on(|| {
                // Ten goroutines all parked, and main joins one of them.
                let hs: Vec<_> = (0..10).map(|_| gokernel::spawn(gokernel::park)).collect();
                for h in hs {
                    h.join().unwrap();
                }
            })
        });
        assert!(matches!(r, Err(Deadlock { .. })), "procs = {procs}");
    }
}

#[test]
fn the_runtime_still_works_after_a_deadlock_and_busy_runs_are_not_deadlocks() {
    let rt = Runtime::builder().procs(2).build().unwrap();
    assert!(matches!(rt.block_on(gokernel::park), Err(Deadlock { .. })));
    // The parked main goroutine stays parked; new work runs normally, and
    // a run whose goroutines park and wake each other is not a deadlock.
    let n = rt.block_on(|| {
        let mut n = 0;
        for _ in 0..1000 {
            let me = gokernel::current();
            let h = gokernel::spawn(move || me.unpark());
            gokernel::park();
            h.join().unwrap();
            n += 1;
        }
        n
    });
    assert_eq!(n, Ok(1000));
    // The second main goroutine's result arrives just before it exits.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rt.num_goroutine() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} goroutines alive; only the deadlocked one should be",
            rt.num_goroutine()
        );
        std::thread::yield_now();
    }
}

#[test]
fn unparking_a_goroutine_of_a_dropped_runtime_does_nothing() {
    let (tx, rx) = mpsc::channel();
    let rt = Runtime::builder().procs(1).build().unwrap();
    let r = rt.block_on(move || {
        tx.send(gokernel::current()).unwrap();
        gokernel::park();
    });
    assert!(matches!(r, Err(Deadlock { .. })));
    let handle = rx.recv().unwrap();
    drop(rt); // frees the parked goroutine
    handle.unpark(); // must not touch it
    handle.unpark();
}

/// Runtime B's goroutine sends (or unlocks) after a delay, while runtime
/// A's only goroutine waits: A must wait for it, not report a deadlock.
#[test]
fn a_wait_on_a_channel_or_mutex_another_runtime_uses_is_not_a_deadlock() {
    let r = within_a_minute(|| {
        let a = Runtime::builder().procs(1).build().unwrap();
        let b = Runtime::builder().procs(1).build().unwrap();
        // A channel made on this plain thread.
        let ch = gokernel::chan::<u32>(0);
        let tx = ch.clone();
        let h = b.spawn(move || {
            gokernel::sleep(Duration::from_millis(50));
            tx.send(7).unwrap();
        });
        let got = a.block_on(move || ch.recv().unwrap());
        h.join().unwrap();
        // A channel made inside runtime B, received on in runtime A.
        let (stx, srx) = mpsc::channel();
        let h = b.spawn(move || {
            let ch = gokernel::chan::<u32>(0);
            stx.send(ch.clone()).unwrap();
            gokernel::sleep(Duration::from_millis(50));
            ch.send(8).unwrap();
        });
        let ch = srx.recv().unwrap();
        let got2 = a.block_on(move || ch.recv().unwrap());
        h.join().unwrap();
        // A Mutex held by runtime B's goroutine while A's waits for it.
        let m = std::sync::Arc::new(gokernel::sync::Mutex::new(0));
        let (m1, m2) = (m.clone(), m.clone());
        let (ltx, lrx) = mpsc::channel();
        let h = b.spawn(move || {
            let mut g = m1.lock();
            ltx.send(()).unwrap();
            gokernel::sleep(Duration::from_millis(50));
            *g += 1;
        });
        lrx.recv().unwrap();
        let got3 = a.block_on(move || *m2.lock());
        h.join().unwrap();
        (got, got2, got3)
    });
    assert_eq!(r, (Ok(7), Ok(8), Ok(1)));
}

#[test]
fn a_wait_on_a_channel_only_this_runtime_uses_is_still_a_deadlock() {
    let r = within_a_minute(|| {
        let a = Runtime::builder().procs(2).build().unwrap();
        a.block_on(|| {
            let ch = gokernel::chan::<u32>(0);
            let m = std::sync::Arc::new(gokernel::sync::Mutex::new(0));
            let held = m.lock();
            let m2 = m.clone();
            gokernel::go(move || drop(m2.lock()));
            let _ = ch.recv();
            drop(held);
        })
    });
    assert!(matches!(r, Err(Deadlock { .. })));
}

/// Starts `rounds` trivial `block_on`s on `rt` from each of `threads`
/// threads at once; returns how many of them reported a deadlock.
fn deadlocks_among_block_ons(rt: &Arc<Runtime>, threads: usize, rounds: usize) -> usize {
    let ts: Vec<_> = (0..threads)
        .map(|_| {
            let rt = rt.clone();
            std::thread::spawn(move || (0..rounds).filter(|_| rt.block_on(|| 1).is_err()).count())
        })
        .collect();
    ts.into_iter().map(|t| t.join().unwrap()).sum()
}

/// A thread outside the runtime starting a goroutine counts as running:
/// the new goroutine is alive before it is queued, and an M idling the
/// last P meanwhile (as one does after every main goroutine here, on one
/// P) took that for a deadlock. 64 idle Ms make its check longer (it looks
/// at every M), and so the window wider: without the fix, 8 threads of
/// 5,000 `block_on`s saw a false deadlock in most runs.
#[test]
fn block_ons_started_from_many_threads_at_once_are_not_deadlocks() {
    let rt = Arc::new(Runtime::builder().procs(1).build().unwrap());
    let ms = rt.block_on(|| {
        let c = gokernel::chan::<()>(0);
        let hs: Vec<_> = (0..64)
            .map(|_| {
                let c = c.clone();
                gokernel::spawn_locked(move || assert!(c.recv().is_err()))
            })
            .collect();
        c.close().unwrap();
        hs.into_iter().map(|h| h.join().unwrap()).count()
    });
    assert_eq!(ms, Ok(64));
    assert_eq!(deadlocks_among_block_ons(&rt, 8, 5_000), 0);
}

/// With a goroutine parked for good, every moment the runtime is idle is a
/// deadlock, and is reported: a `block_on` started after such a report was
/// decided, or whose goroutine finished before its report came, still
/// returns its value.
#[test]
fn block_ons_after_a_deadlock_return_their_values() {
    let rt = Arc::new(Runtime::builder().procs(1).build().unwrap());
    assert!(matches!(rt.block_on(gokernel::park), Err(Deadlock { .. })));
    assert_eq!(deadlocks_among_block_ons(&rt, 4, 5_000), 0);
}
