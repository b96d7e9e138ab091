//! The interrupt-driven poller (`gokernel::netpoll_irq`) in CPU mode:
//! the same `no_std` poller the reference kernel uses, with `SIGURG` sent
//! to a CPU thread standing in for the device interrupt. The poller is
//! installed after the scheduler scenarios (the scheduler had none).

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use core::time::Duration;

use gokernel::netpoll::{MODE_R, WaitError};
use gokernel::netpoll_irq::{IrqPoll, IrqSource, install};
use gokernel::platform::Platform;
use gokernel::proc::gosched;
use gokernel::runtime2::Sched;

use crate::cpus::{NCPUS, all_cpus_asleep, cpu_tid, wait_for};
use crate::platform::IMAGE;
use crate::sys;

/// The source `SIGURG` signals.
static SRC: IrqSource = IrqSource::new();
/// Nothing signals it.
static QUIET: IrqSource = IrqSource::new();

/// The "device interrupt" (any point of a CPU thread's code).
extern "C" fn on_sigurg(_: i32) {
    SRC.signal(MODE_R);
}

/// Rounds of each wake-up check.
pub const ROUNDS: u32 = 300;

/// Installs the poller and the handler.
pub fn start(s: &'static Sched) -> Option<&'static IrqPoll> {
    // SAFETY: the handler calls only IrqSource::signal (interrupt-safe).
    if unsafe { sys::sigaction(sys::SIGURG, on_sigurg) } != 0 {
        return None;
    }
    install(s).ok()
}

/// A goroutine waits on [`SRC`] `ROUNDS` times, each ended by `SIGURG`
/// to a CPU (alternating). With `busy`, two yielding goroutines keep both
/// CPUs busy; without, before each signal both CPU threads are asleep in
/// the kernel and one M is blocked in the poller. Returns (wake-ups,
/// rounds with that idle state seen before the signal).
pub fn wakes(s: &'static Sched, poller: &'static IrqPoll, busy: bool) -> (u32, u32) {
    let woke = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let left = Arc::new(AtomicU32::new(0));
    let w = woke.clone();
    s.go(Box::new(move || {
        for _ in 0..ROUNDS {
            if SRC.wait(MODE_R, None).is_ok() {
                w.fetch_add(1, Ordering::Release);
                IMAGE.futexwakeup(&w, 1);
            }
        }
    }))
    .expect("spawn the waiter");
    if busy {
        for _ in 0..NCPUS {
            let (stop, left) = (stop.clone(), left.clone());
            left.fetch_add(1, Ordering::SeqCst);
            s.go(Box::new(move || {
                while !stop.load(Ordering::Relaxed) {
                    gosched();
                }
                left.fetch_sub(1, Ordering::SeqCst);
                IMAGE.futexwakeup(&left, 1);
            }))
            .expect("spawn a busy goroutine");
        }
    }
    let mut idle = 0;
    for i in 0..ROUNDS {
        if !busy && all_cpus_asleep(s) && poller.blocked() == 1 {
            idle += 1;
        }
        sys::tgkill(cpu_tid(i as usize), sys::SIGURG);
        if !wait_for(&woke, i + 1, 10) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    while left.load(Ordering::SeqCst) != 0 {
        IMAGE.futexsleep(&left, left.load(Ordering::SeqCst), Some(10_000_000));
    }
    (woke.load(Ordering::Acquire), idle)
}

/// The length of [`deadline`]'s wait.
pub const DEADLINE_MS: u64 = 60;

/// A [`DEADLINE_MS`] wait on [`QUIET`], which nothing signals. Returns
/// its result, its length in ms, and whether, while it was in progress,
/// both CPU threads were seen asleep with one M blocked in the poller
/// (polled every 0.2 ms from its start: how soon the threads settle
/// depends on the host's load, so no one moment is right to look).
pub fn deadline(s: &'static Sched, poller: &'static IrqPoll) -> (Result<(), WaitError>, u64, bool) {
    let done = Arc::new(AtomicU32::new(0));
    let out = Arc::new(spin::Mutex::new(None::<(Result<(), WaitError>, u64)>));
    let (d, o) = (done.clone(), out.clone());
    s.go(Box::new(move || {
        let t = IMAGE.nanotime();
        let r = QUIET.wait(MODE_R, Some(Duration::from_millis(DEADLINE_MS)));
        *o.lock() = Some((r, (IMAGE.nanotime() - t) / 1_000_000));
        d.store(1, Ordering::Release);
        IMAGE.futexwakeup(&d, 1);
    }))
    .expect("spawn the waiter");
    let mut idle = false;
    while !idle && done.load(Ordering::Acquire) == 0 {
        let seen = poller.blocked() == 1
            && (0..NCPUS).all(|i| sys::thread_stat(cpu_tid(i)).is_some_and(|(c, _)| c == b'S'));
        // Seen before the wait ended, or it does not count.
        idle = seen && done.load(Ordering::Acquire) == 0;
        if !idle {
            IMAGE.futexsleep(&done, 0, Some(200_000));
        }
    }
    wait_for(&done, 1, 10);
    let (r, ms) = out
        .lock()
        .take()
        .unwrap_or((Err(WaitError::NotGoroutine), 0));
    (r, ms, idle)
}
