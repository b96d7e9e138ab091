//! The poller scenarios: goroutines that wait on device event sources
//! through the scheduler's network poller (`gokernel::netpoll_irq`), made
//! ready by interrupt handlers — the netpoll contract of the hosted
//! sockets, fed by interrupts.
//!
//! The interrupts are real: the local APIC timer in one-shot mode (every
//! CPU has one, so the scenarios run on 1 CPU too, and the handler runs
//! on the CPU that armed it, which is halted when everything is idle),
//! and the device IPI of `irq.rs` sent by another CPU (or the same one on
//! 1 CPU). The serial port's interrupt would need the IOAPIC, which this
//! kernel does not program.
//!
//! - `poll-device-wait`: a goroutine waits on an [`IrqSource`] 200 times;
//!   each time the device interrupt, raised on a CPU chosen round-robin,
//!   signals it.
//! - `poll-timer-idle`: every goroutine parked; the APIC timer fires and
//!   its handler finds every CPU halted, one of them blocked in the
//!   poller (`netpoll(-1)`: the idle CPU's `hlt`), and signals the
//!   source; the waiter must run.
//! - `poll-timer-busy`: the same with every CPU running yielding
//!   goroutines (no CPU halted, nobody blocked in the poller): the signal
//!   reaches an M through the poll request on the injection list.
//! - `poll-deadline`: nothing signals; the wait's 30 ms deadline must end
//!   it with `Timeout`. A timer event at 10 ms (which signals nothing)
//!   checks that every CPU was halted meanwhile, one in the poller with
//!   the deadline as its time-out.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use core::time::Duration;

use gokernel::netpoll::{MODE_R, WaitError};
use gokernel::netpoll_irq::{IrqPoll, IrqSource};
use gokernel::proc::gosched;

use crate::cpu::{self, CPUS, ONLINE};
use crate::scenarios::{Host, Report, run_g};
use crate::x86;

/// The source the device interrupt signals.
static DEV_SRC: IrqSource = IrqSource::new();
/// The source the timer interrupt signals (when [`TIMER_SIGNALS`]).
static TIMER_SRC: IrqSource = IrqSource::new();
/// Nothing signals it.
static QUIET_SRC: IrqSource = IrqSource::new();

/// Whether the timer handler signals [`TIMER_SRC`].
static TIMER_SIGNALS: AtomicBool = AtomicBool::new(true);
/// What the timer handler saw: CPUs halted, Ms blocked in the poller.
static HALTED: AtomicUsize = AtomicUsize::new(usize::MAX);
static BLOCKED: AtomicU32 = AtomicU32::new(u32::MAX);

/// The scheduler's poller.
static POLLER: spin::Once<&'static IrqPoll> = spin::Once::new();

/// The device interrupt's handler (interrupt context).
fn on_device() {
    DEV_SRC.signal(MODE_R);
}

/// The timer event's handler (interrupt context): note what the CPUs do,
/// then signal (or not).
fn on_timer() {
    let halted = CPUS[..ONLINE.load(Ordering::Acquire)]
        .iter()
        .filter(|c| c.waiting_on.load(Ordering::SeqCst) != 0)
        .count();
    HALTED.store(halted, Ordering::SeqCst);
    let blocked = POLLER.get().map_or(u32::MAX, |p| p.blocked());
    BLOCKED.store(blocked, Ordering::SeqCst);
    if TIMER_SIGNALS.load(Ordering::SeqCst) {
        TIMER_SRC.signal(MODE_R);
    }
}

const ROUNDS: u32 = 200;

/// `poll-device-wait`: returns the rounds the waiter saw.
fn device_wait(h: Host) -> Option<u32> {
    run_g(h, 60, move || {
        let ack = gokernel::chan::<bool>(0);
        let a = ack.clone();
        h.sched
            .go(Box::new(move || {
                for _ in 0..ROUNDS {
                    a.send(DEV_SRC.wait(MODE_R, None).is_ok()).unwrap();
                }
            }))
            .expect("spawn the waiter");
        let n = ONLINE.load(Ordering::Acquire);
        let mut seen = 0;
        for i in 0..ROUNDS {
            cpu::raise_device(i as usize % n);
            seen += u32::from(ack.recv().unwrap());
        }
        seen
    })
}

/// `poll-timer-busy` (`busy`) or `poll-timer-idle`: arms the timer event
/// on this CPU with every CPU busy or every CPU idle; returns whether the
/// waiter woke (`Ok`), CPUs halted and Ms blocked in the poller when the
/// timer fired.
fn timer_wakes(h: Host, busy: bool) -> Option<(bool, usize, u32)> {
    run_g(h, 60, move || {
        TIMER_SIGNALS.store(true, Ordering::SeqCst);
        HALTED.store(usize::MAX, Ordering::SeqCst);
        BLOCKED.store(u32::MAX, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let woke = gokernel::chan::<bool>(1);
        let (st, w) = (stop.clone(), woke.clone());
        h.sched
            .go(Box::new(move || {
                let r = TIMER_SRC.wait(MODE_R, Some(Duration::from_secs(20)));
                st.store(true, Ordering::SeqCst);
                w.send(r.is_ok()).unwrap();
            }))
            .expect("spawn the waiter");
        if busy {
            // A yielding goroutine on every CPU (as irq-timer-busy).
            crate::irq::occupy_every_cpu(h, &stop);
            cpu::timer_event_in(2_000_000);
            while !stop.load(Ordering::SeqCst) {
                gosched();
            }
        } else {
            cpu::timer_event_in(50_000_000);
        }
        let ok = woke.recv().unwrap_or(false);
        (
            ok,
            HALTED.load(Ordering::SeqCst),
            BLOCKED.load(Ordering::SeqCst),
        )
    })
}

/// `poll-deadline`: a 30 ms wait nothing signals, and a silent timer
/// event at 10 ms; returns the wait's result, its length in ms, and what
/// the timer saw (CPUs halted, Ms blocked in the poller).
fn deadline(h: Host) -> Option<(Result<(), WaitError>, u64, usize, u32)> {
    run_g(h, 60, move || {
        TIMER_SIGNALS.store(false, Ordering::SeqCst);
        HALTED.store(usize::MAX, Ordering::SeqCst);
        BLOCKED.store(u32::MAX, Ordering::SeqCst);
        cpu::timer_event_in(10_000_000);
        let t = x86::nanotime();
        let r = QUIET_SRC.wait(MODE_R, Some(Duration::from_millis(30)));
        let ms = (x86::nanotime() - t) / 1_000_000;
        TIMER_SIGNALS.store(true, Ordering::SeqCst);
        (
            r,
            ms,
            HALTED.load(Ordering::SeqCst),
            BLOCKED.load(Ordering::SeqCst),
        )
    })
}

/// Runs the poller scenarios.
pub fn run_all(h: Host, r: &mut Report) {
    // glue: begin
    let installed = gokernel::netpoll_irq::install(h.sched);
    // glue: end
    r.check(
        "poll-install",
        installed.is_ok(),
        format_args!("netpoll_irq::install: {:?}", installed.map(|_| ())),
    );
    let Ok(poller) = installed else { return };
    POLLER.call_once(|| poller);
    cpu::set_device_hook(on_device);
    cpu::set_timer_hook(on_timer);
    let n = ONLINE.load(Ordering::Acquire);

    let seen = device_wait(h);
    r.check(
        "poll-device-wait",
        seen == Some(ROUNDS),
        format_args!(
            "a goroutine waiting on an IrqSource through the poller was woken {seen:?} times of {ROUNDS} by the device interrupt, raised on each of {n} CPUs in turn"
        ),
    );

    // Every CPU idle: on a slow host a CPU may still be on its way to
    // sleep when the timer fires, so up to 5 tries; each must wake the
    // waiter, and one must find every CPU halted, one in the poller.
    let mut idle = None;
    for _ in 0..5 {
        idle = timer_wakes(h, false);
        if !idle.is_some_and(|(ok, halted, blocked)| ok && (halted != n || blocked != 1)) {
            break;
        }
    }
    r.check(
        "poll-timer-idle",
        idle == Some((true, n, 1)),
        format_args!(
            "(woken, CPUs halted, Ms blocked in the poller when the APIC timer fired) = {idle:?}: every one of {n} CPUs idle, one in netpoll"
        ),
    );

    let busy = timer_wakes(h, true);
    r.check(
        "poll-timer-busy",
        busy == Some((true, 0, 0)),
        format_args!(
            "(woken, CPUs halted, Ms blocked in the poller when the APIC timer fired) = {busy:?}: every CPU busy"
        ),
    );

    let mut dl = None;
    for _ in 0..5 {
        dl = deadline(h);
        if !dl.is_some_and(|(res, ms, halted, blocked)| {
            res == Err(WaitError::Timeout) && ms >= 30 && (halted != n || blocked != 1)
        }) {
            break;
        }
    }
    r.check(
        "poll-deadline",
        dl.is_some_and(|(res, ms, halted, blocked)| {
            res == Err(WaitError::Timeout) && ms >= 30 && halted == n && blocked == 1
        }),
        format_args!(
            "(result, ms, CPUs halted and Ms in the poller at 10 ms) = {dl:?}: a 30 ms wait nothing signals ends by its deadline, every one of {n} CPUs halted meanwhile"
        ),
    );
}
