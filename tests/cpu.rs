//! CPUs that join a scheduler (`gokernel::cpu`) and wake-ups from
//! interrupt handlers (`gokernel::intr`), hosted: std threads stand in for
//! CPUs, a platform that refuses to start threads for a kernel's, and
//! POSIX signals for interrupts. The freestanding image runs the same in
//! CPU mode (`image/src/cpus.rs`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gokernel::cpu::{GoLockedError, try_go_locked};
use gokernel::intr::{IrqEvent, IrqWork};
use gokernel::platform::hosted::HOSTED;
use gokernel::platform::{NewOsProcError, Platform};
use gokernel::runtime2::{M, Sched};
use gokernel::stack::STACK_MIN;

use common::within;

/// A kernel's platform, hosted: futexes and the clock from the hosted
/// platform, but no threads (`starts_threads` false; `newosproc` fails
/// and counts the calls, which must not happen).
struct NoThreads {
    newosproc: AtomicU32,
}

// SAFETY: the futex and clock promises are the hosted platform's;
// newosproc never starts anything.
unsafe impl Platform for NoThreads {
    /// # Safety
    ///
    /// As [`Platform::newosproc`] (it does nothing).
    unsafe fn newosproc(&self, _: *mut M) -> Result<(), NewOsProcError> {
        self.newosproc.fetch_add(1, Ordering::SeqCst);
        Err(NewOsProcError)
    }
    fn starts_threads(&self) -> bool {
        false
    }
    fn futexsleep(&self, addr: &AtomicU32, val: u32, timeout_ns: Option<u64>) {
        HOSTED.futexsleep(addr, val, timeout_ns)
    }
    fn futexwakeup(&self, addr: &AtomicU32, cnt: u32) {
        HOSTED.futexwakeup(addr, cnt)
    }
    fn ncpu(&self) -> usize {
        2
    }
    fn nanotime(&self) -> u64 {
        HOSTED.nanotime()
    }
}

/// A scheduler of `procs` Ps on a platform that starts no threads, and
/// `cpus` std threads joined to it.
fn cpus(procs: usize, cpus: usize) -> (&'static Sched, &'static NoThreads, Vec<JoinHandle<()>>) {
    let p: &'static NoThreads = Box::leak(Box::new(NoThreads {
        newosproc: AtomicU32::new(0),
    }));
    let sched = Sched::leak(Sched::new(procs, STACK_MIN, p));
    let threads = (0..cpus)
        .map(|_| {
            std::thread::spawn(move || {
                // SAFETY: a std thread has its own TLS block and runs
                // nothing else of gokernel's.
                unsafe { gokernel::cpu::join(sched) }
            })
        })
        .collect();
    (sched, p, threads)
}

/// Shuts `sched` down and checks that every joined thread's `join`
/// returned.
fn leave(sched: &'static Sched, threads: Vec<JoinHandle<()>>) {
    within(20, "shutting down the joined CPUs", move || {
        sched.shutdown();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(sched.joined_cpus(), 0);
    });
}

/// Runs `f` as a goroutine of `sched`; its result, or a failure after
/// `secs` seconds.
fn run_g<T: Send + 'static>(
    sched: &'static Sched,
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let c = gokernel::chan::<T>(1);
    let tx = c.clone();
    sched
        .go(Box::new(move || {
            let _ = tx.send(f());
        }))
        .unwrap();
    within(secs, "the goroutine", move || c.recv().unwrap())
}

#[test]
fn two_joined_cpus_run_every_goroutine_and_no_thread_is_started() {
    let (sched, p, threads) = cpus(2, 2);
    let most = run_g(sched, 60, move || {
        let wg = Arc::new(gokernel::sync::WaitGroup::new());
        let total = Arc::new(gokernel::sync::Mutex::new(0u64));
        let most = Arc::new(AtomicU32::new(0));
        for i in 0..10_000u64 {
            wg.add(1);
            let (wg, total, most) = (wg.clone(), total.clone(), most.clone());
            sched
                .go(Box::new(move || {
                    if i % 100 == 0 {
                        gokernel::sleep(Duration::from_millis(1));
                        most.fetch_max(sched.stats().threads as u32, Ordering::Relaxed);
                    }
                    *total.lock() += i;
                    wg.done();
                }))
                .unwrap();
        }
        wg.wait();
        assert_eq!(*total.lock(), 10_000 * 9_999 / 2);
        most.load(Ordering::Relaxed)
    });
    assert!(most <= 2, "{most} Ms ran goroutines; 2 CPUs joined");
    assert_eq!(sched.stats().threads, 2);
    assert_eq!(
        p.newosproc.load(Ordering::SeqCst),
        0,
        "newosproc was called"
    );
    leave(sched, threads);
}

#[test]
fn work_queued_before_any_cpu_joins_runs_when_one_does() {
    let p: &'static NoThreads = Box::leak(Box::new(NoThreads {
        newosproc: AtomicU32::new(0),
    }));
    let sched = Sched::leak(Sched::new(1, STACK_MIN, p));
    let c = gokernel::chan::<u32>(1);
    let tx = c.clone();
    // The boot CPU starts the first goroutine, then joins: no M exists yet.
    sched.go(Box::new(move || tx.send(5).unwrap())).unwrap();
    let cpu = std::thread::spawn(move || {
        // SAFETY: a std thread has its own TLS block.
        unsafe { gokernel::cpu::join(sched) }
    });
    assert_eq!(within(10, "the first goroutine", move || c.recv()), Ok(5));
    assert_eq!(p.newosproc.load(Ordering::SeqCst), 0);
    leave(sched, vec![cpu]);
}

#[test]
fn a_goroutine_ready_while_every_cpu_is_busy_runs_when_one_yields() {
    let (sched, _, threads) = cpus(2, 2);
    let stop = Arc::new(AtomicBool::new(false));
    for _ in 0..2 {
        let stop = stop.clone();
        sched
            .go(Box::new(move || {
                while !stop.load(Ordering::Relaxed) {
                    gokernel::gosched();
                }
            }))
            .unwrap();
    }
    // Both CPUs run yielding goroutines; one more still gets its turn.
    let r = run_g(sched, 20, || 7);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(r, 7);
    leave(sched, threads);
}

/// The event the signal tests' handler signals, and the work it posts.
static SIG_EV: IrqEvent = IrqEvent::new();
static SIG_RUNS: AtomicU32 = AtomicU32::new(0);
static SIG_WORK: IrqWork = IrqWork::new(|| {
    SIG_RUNS.fetch_add(1, Ordering::SeqCst);
});
static SIG_SCHED: std::sync::OnceLock<&'static Sched> = std::sync::OnceLock::new();

/// The "interrupt handler": only interrupt-safe calls.
extern "C" fn on_sigusr1(_: libc::c_int) {
    SIG_EV.signal();
    if let Some(s) = SIG_SCHED.get() {
        SIG_WORK.post(s);
    }
}

#[test]
fn a_signal_handler_readies_a_goroutine_on_busy_and_on_idle_cpus() {
    const ROUNDS: u32 = 200;
    let (sched, _, threads) = cpus(2, 2);
    assert!(SIG_SCHED.set(sched).is_ok());
    // SAFETY: the handler only makes interrupt-safe calls; SA_ONSTACK
    // uses the alternate stack every M has.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigusr1 as *const () as usize;
        sa.sa_flags = libc::SA_ONSTACK;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let pthreads: Vec<libc::pthread_t> = threads
        .iter()
        .map(std::os::unix::thread::JoinHandleExt::as_pthread_t)
        .collect();
    for busy in [false, true] {
        let woke = Arc::new(AtomicU32::new(0));
        let w = woke.clone();
        sched
            .go(Box::new(move || {
                for _ in 0..ROUNDS {
                    SIG_EV.wait(sched);
                    w.fetch_add(1, Ordering::SeqCst);
                }
            }))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        if busy {
            for _ in 0..2 {
                let stop = stop.clone();
                sched
                    .go(Box::new(move || {
                        while !stop.load(Ordering::Relaxed) {
                            gokernel::gosched();
                        }
                    }))
                    .unwrap();
            }
        }
        for i in 0..ROUNDS {
            // SAFETY: the thread is alive (joined until shutdown).
            assert_eq!(
                unsafe { libc::pthread_kill(pthreads[i as usize % 2], libc::SIGUSR1) },
                0
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while woke.load(Ordering::SeqCst) <= i {
                assert!(
                    Instant::now() < deadline,
                    "round {i} (busy: {busy}): the goroutine was not woken"
                );
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        stop.store(true, Ordering::Relaxed);
    }
    assert!(SIG_RUNS.load(Ordering::SeqCst) > 0, "no IrqWork run");
    leave(sched, threads);
}

/// Starts a goroutine of `sched` that waits on `ev`, then sends on the
/// channel returned.
fn spawn_waiter(sched: &'static Sched, ev: &'static IrqEvent) -> gokernel::Chan<()> {
    let c = gokernel::chan::<()>(1);
    let tx = c.clone();
    sched
        .go(Box::new(move || {
            ev.wait(sched);
            tx.send(()).unwrap();
        }))
        .unwrap();
    c
}

#[test]
fn a_signal_before_the_wait_is_kept() {
    static EV: IrqEvent = IrqEvent::new();
    let (sched, _, threads) = cpus(1, 1);
    EV.signal();
    EV.signal(); // merged: one wake-up
    let r = run_g(sched, 10, move || {
        EV.wait(sched); // returns at once
        // A second wait parks until the next signal.
        let c = spawn_waiter(sched, &EV);
        gokernel::sleep(Duration::from_millis(20));
        let early = c.try_recv().is_ok();
        EV.signal();
        c.recv().unwrap();
        early
    });
    assert!(!r, "the second wait returned without a signal");
    leave(sched, threads);
}

#[test]
fn irq_work_posted_from_a_plain_thread_runs_on_a_cpu() {
    static RAN_ON_M: AtomicU32 = AtomicU32::new(0);
    static WORK: IrqWork = IrqWork::new(|| {
        // On g0 of an M: a current G, and no goroutine.
        if !gokernel::getg().is_null() {
            RAN_ON_M.fetch_add(1, Ordering::SeqCst);
        }
    });
    let (sched, _, threads) = cpus(1, 1);
    for n in 1..=50 {
        WORK.post(sched);
        within(10, "the posted work", move || {
            while RAN_ON_M.load(Ordering::SeqCst) < n {
                std::thread::yield_now();
            }
        });
    }
    leave(sched, threads);
}

#[test]
fn lock_os_thread_keeps_the_cpu_and_try_go_locked_finds_none_free() {
    let (sched, _, threads) = cpus(2, 2);
    let (first, second) = run_g(sched, 20, move || {
        gokernel::proc::lock_os_thread();
        let me = std::thread::current().id();
        // A goroutine started from here runs on the other CPU and wakes
        // us; we stay on ours.
        for _ in 0..100 {
            // SAFETY: on a goroutine.
            let p = unsafe { gokernel::proc::Parker::current() };
            let w = p.clone();
            sched.go(Box::new(move || w.unpark())).unwrap();
            // SAFETY: our own parker.
            unsafe { p.park() };
            assert_eq!(std::thread::current().id(), me);
        }
        // The other CPU is free once the wakers above have finished and it
        // has gone idle: try until it is (the event this waits for).
        let on_free_cpu = |f: Box<dyn FnOnce() + Send>| {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut f = Some(f);
            loop {
                // The closure goes through a channel, so that a refused
                // start (which drops the goroutine's own closure) keeps it.
                let tx = gokernel::chan::<Box<dyn FnOnce() + Send>>(1);
                let rx = tx.clone();
                tx.send(f.take().unwrap()).unwrap();
                match try_go_locked(sched, Box::new(move || (rx.recv().unwrap())())) {
                    Err(GoLockedError::NoFreeCpu) if Instant::now() < deadline => {
                        f = Some(tx.recv().unwrap());
                        gokernel::sleep(Duration::from_millis(1));
                    }
                    r => break r,
                }
            }
        };
        let done = gokernel::chan::<std::thread::ThreadId>(1);
        let d = done.clone();
        let first = on_free_cpu(Box::new(move || {
            d.send(std::thread::current().id()).unwrap()
        }));
        let other = done.recv().unwrap();
        // Now take the other CPU for good, locked: both CPUs are taken
        // (ours is locked to us), and a third has nowhere to go.
        let blocker = gokernel::chan::<()>(0);
        let rx = blocker.clone();
        let taken = on_free_cpu(Box::new(move || {
            let _ = rx.recv();
        }));
        let second = try_go_locked(sched, Box::new(|| {}));
        blocker.close().unwrap();
        gokernel::proc::unlock_os_thread();
        assert!(taken.is_ok(), "{taken:?}");
        (first.is_ok() && other != me, second)
    });
    assert!(
        first,
        "the first locked goroutine did not run on the other CPU"
    );
    assert_eq!(second, Err(GoLockedError::NoFreeCpu));
    leave(sched, threads);
}

#[test]
fn go_locked_without_a_free_cpu_panics_naming_the_problem() {
    let (sched, _, threads) = cpus(1, 1);
    // The one CPU runs a goroutine for good (until shutdown): not free.
    let started = gokernel::chan::<()>(1);
    let (tx, stop) = (started.clone(), gokernel::chan::<()>(0));
    let rx = stop.clone();
    sched
        .go(Box::new(move || {
            tx.send(()).unwrap();
            let _ = rx.recv();
        }))
        .unwrap();
    started.recv().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sched.go_locked(Box::new(|| {}))
    }));
    let msg = r
        .expect_err("go_locked started a goroutine with no CPU for it")
        .downcast::<String>()
        .unwrap();
    assert!(msg.contains("no joined CPU is free"), "{msg}");
    stop.close().unwrap();
    leave(sched, threads);
}

#[test]
fn work_on_a_p_no_cpu_can_take_runs_while_the_other_cpu_is_busy() {
    // CPU X runs a goroutine that yields forever (it never runs out of
    // work, so it never steals); CPU Y runs a locked goroutine A that
    // starts B and parks until B answers. A's P, with B on it, is handed
    // off with no M free to take it: B must still run (from the global
    // queue, which X looks at every 61st schedule).
    let (sched, _, threads) = cpus(2, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let busy = gokernel::chan::<()>(1);
    let (s2, b2) = (stop.clone(), busy.clone());
    sched
        .go(Box::new(move || {
            b2.send(()).unwrap();
            while !s2.load(Ordering::Relaxed) {
                gokernel::gosched();
            }
        }))
        .unwrap();
    busy.recv().unwrap();
    let done = gokernel::chan::<()>(1);
    let d = done.clone();
    let mut a: Option<Box<dyn FnOnce() + Send>> = Some(Box::new(move || {
        let ack = gokernel::chan::<()>(0);
        let tx = ack.clone();
        sched.go(Box::new(move || tx.send(()).unwrap())).unwrap();
        ack.recv().unwrap(); // parks: A's CPU sleeps, its P (with B) is handed off
        d.send(()).unwrap();
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The other CPU is free once it has gone idle. The closure goes
        // through a channel, so that a refused start keeps it.
        let tx = gokernel::chan::<Box<dyn FnOnce() + Send>>(1);
        let back = tx.clone();
        tx.send(a.take().unwrap()).unwrap();
        match try_go_locked(sched, Box::new(move || (back.recv().unwrap())())) {
            Ok(_) => break,
            Err(GoLockedError::NoFreeCpu) if Instant::now() < deadline => {
                a = Some(tx.recv().unwrap());
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    }
    within(20, "B, on a P with no CPU for it", move || {
        done.recv().unwrap()
    });
    stop.store(true, Ordering::Relaxed);
    leave(sched, threads);
}

/// The message of a caught panic payload.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast_ref::<&str>()
            .map_or_else(|| "<not a string>".into(), |s| (*s).into()),
    }
}

#[test]
fn a_second_waiter_on_an_irq_event_panics_and_the_first_still_gets_the_signal() {
    static EV: IrqEvent = IrqEvent::new();
    let (sched, _, threads) = cpus(1, 1);
    let text = run_g(sched, 20, move || {
        let c = spawn_waiter(sched, &EV);
        // Until the first waiter is parked on the event.
        while sched
            .stats()
            .waiting_by_reason
            .get(gokernel::WaitReason::Interrupt)
            == 0
        {
            gokernel::gosched();
        }
        let second = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| EV.wait(sched)));
        EV.signal();
        c.recv().unwrap(); // the first waiter was woken by it
        panic_text(second.expect_err("a second waiter was let in"))
    });
    assert!(
        text.contains("IrqEvent::wait: another goroutine is waiting on this event"),
        "{text}"
    );
    leave(sched, threads);
}

#[test]
fn an_irq_event_wait_given_another_scheduler_panics() {
    static EV: IrqEvent = IrqEvent::new();
    let (a, _, a_threads) = cpus(1, 1);
    let (b, _, b_threads) = cpus(1, 1);
    let text = run_g(a, 20, move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| EV.wait(b)));
        panic_text(r.expect_err("a wait with another goroutine's scheduler was let in"))
    });
    assert!(
        text.contains("the scheduler given is not the calling goroutine's"),
        "{text}"
    );
    // The event is untouched: a signal and a wait on the right scheduler
    // still pair up.
    EV.signal();
    run_g(a, 20, move || EV.wait(a));
    leave(a, a_threads);
    leave(b, b_threads);
}
