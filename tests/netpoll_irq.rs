//! The bare-metal poller (`gokernel::netpoll_irq`), hosted: the same
//! `Netpoll` contract as epoll, fed by `IrqSource::signal` from threads
//! and POSIX signal handlers standing in for interrupts. The reference
//! kernel runs it with real interrupts (`kernel/src/poll_scenarios.rs`),
//! the freestanding image with signals (`image/src/poll.rs`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use gokernel::netpoll::{MODE_R, MODE_W, WaitError};
use gokernel::netpoll_irq::{EBADF, EBUSY, IrqPoll, IrqSource, PollerExists, install};
use gokernel::platform::hosted::HOSTED;
use gokernel::runtime2::Sched;
use gokernel::stack::STACK_MIN;

use common::within;

/// A leaked scheduler of `procs` Ps with the interrupt-driven poller.
fn sched(procs: usize) -> (&'static Sched, &'static IrqPoll) {
    let s = Sched::leak(Sched::new(procs, STACK_MIN, &HOSTED));
    let p = install(s).expect("a new scheduler has no poller");
    (s, p)
}

/// Waits (up to 10 s) until `f` holds.
fn until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn a_signal_wakes_the_goroutine_while_the_idle_m_is_blocked_in_the_poller() {
    static SRC: IrqSource = IrqSource::new();
    within(30, "the wake-up", || {
        let (s, poller) = sched(2);
        let done = gokernel::chan::<Result<(), WaitError>>(1);
        let d = done.clone();
        s.go(Box::new(move || d.send(SRC.wait(MODE_R, None)).unwrap()))
            .unwrap();
        // The goroutine parked, and the M that went idle blocks in the
        // poller's netpoll(-1) (the timer sleeper, with a waiter as its
        // timer at +inf).
        until("an M blocked in the poller", || poller.blocked() == 1);
        assert!(
            done.try_recv().is_err(),
            "the wait returned before the signal"
        );
        SRC.signal(MODE_R);
        assert_eq!(done.recv().unwrap(), Ok(()));
        s.shutdown();
    });
}

#[test]
fn the_deadline_ends_a_wait_that_nothing_signals() {
    static SRC: IrqSource = IrqSource::new();
    within(30, "the deadline", || {
        let (s, poller) = sched(1);
        let done = gokernel::chan::<(Result<(), WaitError>, Duration)>(1);
        let d = done.clone();
        s.go(Box::new(move || {
            let t = Instant::now();
            let r = SRC.wait(MODE_R, Some(Duration::from_millis(50)));
            d.send((r, t.elapsed())).unwrap();
        }))
        .unwrap();
        until("an M blocked in the poller", || poller.blocked() == 1);
        let (r, took) = done.recv().unwrap();
        assert_eq!(r, Err(WaitError::Timeout));
        assert!(
            took >= Duration::from_millis(50),
            "timed out after {took:?}"
        );
        s.shutdown();
    });
}

#[test]
fn a_signal_before_the_first_wait_is_kept_and_directions_are_separate() {
    static SRC: IrqSource = IrqSource::new();
    within(30, "the kept signal", || {
        let (s, _) = sched(1);
        // Before the source is armed: kept in the source.
        SRC.signal(MODE_R);
        let done = gokernel::chan::<[Result<(), WaitError>; 4]>(1);
        let d = done.clone();
        s.go(Box::new(move || {
            let short = Some(Duration::from_millis(20));
            let kept = SRC.wait(MODE_R, None);
            // Consumed: the next read wait times out, and a write wait
            // never saw a signal.
            let again = SRC.wait(MODE_R, short);
            let write = SRC.wait(MODE_W, short);
            // Armed now: a signal with nobody waiting is kept too.
            SRC.signal(MODE_W);
            let write2 = SRC.wait(MODE_W, None);
            d.send([kept, again, write, write2]).unwrap();
        }))
        .unwrap();
        assert_eq!(
            done.recv().unwrap(),
            [
                Ok(()),
                Err(WaitError::Timeout),
                Err(WaitError::Timeout),
                Ok(())
            ]
        );
        s.shutdown();
    });
}

#[test]
fn a_signal_consumed_at_the_deadline_is_reported_not_lost_as_a_timeout() {
    static SRC: IrqSource = IrqSource::new();
    within(30, "the polling waits", || {
        let (s, _) = sched(1);
        let done = gokernel::chan::<bool>(1);
        let d = done.clone();
        s.go(Box::new(move || {
            // Arm the source, then signal it with nobody waiting.
            let _ = SRC.wait(MODE_R, Some(Duration::ZERO));
            SRC.signal(MODE_R);
            // Waits whose deadline has passed already: each consumes the
            // readiness if the poller has reported it. One must say Ok:
            // reporting Timeout there would lose the signal for good.
            let t = Instant::now();
            let mut got = false;
            while !got && t.elapsed() < Duration::from_secs(5) {
                got = SRC.wait(MODE_R, Some(Duration::ZERO)).is_ok();
                gokernel::gosched();
            }
            d.send(got).unwrap();
        }))
        .unwrap();
        assert!(done.recv().unwrap(), "the signal was never reported");
        s.shutdown();
    });
}

static SIG_SRC: IrqSource = IrqSource::new();
static HANDLED: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_sigusr2(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::SeqCst);
    SIG_SRC.signal(MODE_R);
}

#[test]
fn posix_signal_handlers_wake_the_waiter_while_every_p_is_busy_and_while_idle() {
    // SAFETY: the handler touches only atomics and IrqSource::signal,
    // which is interrupt-safe (and so async-signal-safe).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr2 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
    }
    within(120, "the signal rounds", || {
        let (s, poller) = sched(2);
        const ROUNDS: u32 = 200;
        let woke = Arc::new(AtomicU32::new(0));
        let w = woke.clone();
        s.go(Box::new(move || {
            for _ in 0..2 * ROUNDS {
                SIG_SRC.wait(MODE_R, None).unwrap();
                w.fetch_add(1, Ordering::SeqCst);
            }
        }))
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut blocked_seen = 0;
        for busy in [true, false] {
            let peers = busy.then(|| {
                let st = stop.clone();
                s.go(Box::new(move || {
                    let peers = common::busy_peers(2, &st);
                    for p in peers {
                        p.join().unwrap();
                    }
                }))
                .unwrap()
            });
            for _ in 0..ROUNDS {
                let seen = woke.load(Ordering::SeqCst);
                if !busy {
                    // Every P idle: the idle M blocks in the poller.
                    until("an M blocked in the poller", || poller.blocked() == 1);
                    blocked_seen += 1;
                }
                // SAFETY: a plain signal to this process.
                unsafe { libc::kill(libc::getpid(), libc::SIGUSR2) };
                until("the wake-up", || woke.load(Ordering::SeqCst) > seen);
            }
            stop.store(true, Ordering::SeqCst);
            let _ = peers;
        }
        assert_eq!(woke.load(Ordering::SeqCst), 2 * ROUNDS);
        assert_eq!(blocked_seen, ROUNDS);
        assert!(HANDLED.load(Ordering::SeqCst) >= 2 * ROUNDS);
        s.shutdown();
    });
}

#[test]
fn misuse_is_an_error_not_a_wrong_wake_up() {
    static SRC: IrqSource = IrqSource::new();
    static OTHER: IrqSource = IrqSource::new();
    within(30, "the misuse checks", || {
        // Outside a goroutine.
        assert_eq!(SRC.wait(MODE_R, None), Err(WaitError::NotGoroutine));
        // A second poller for one scheduler.
        let (s, _) = sched(1);
        assert_eq!(install(s).err(), Some(PollerExists));
        // A source armed with one scheduler, waited on from another.
        let (t, _) = sched(1);
        let done = gokernel::chan::<Result<(), WaitError>>(1);
        let d = done.clone();
        s.go(Box::new(move || {
            d.send(SRC.wait(MODE_R, Some(Duration::ZERO))).unwrap()
        }))
        .unwrap();
        assert_eq!(done.recv().unwrap(), Err(WaitError::Timeout));
        let d = done.clone();
        t.go(Box::new(move || d.send(SRC.wait(MODE_R, None)).unwrap()))
            .unwrap();
        assert_eq!(done.recv().unwrap(), Err(WaitError::Poller(EBUSY)));
        // A scheduler whose poller is epoll (made by the first wait).
        let e = Sched::leak(Sched::new(1, STACK_MIN, &HOSTED));
        let d = done.clone();
        e.go(Box::new(move || d.send(OTHER.wait(MODE_R, None)).unwrap()))
            .unwrap();
        assert_eq!(done.recv().unwrap(), Err(WaitError::Poller(EBADF)));
        assert_eq!(install(e).err(), Some(PollerExists));
        for x in [s, t, e] {
            x.shutdown();
        }
    });
}
