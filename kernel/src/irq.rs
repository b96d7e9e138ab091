//! The interrupt-driven scenarios: goroutines woken by hardware
//! interrupts through `gokernel::intr`, the way a driver's would be.
//!
//! - `irq-device-wait`: a goroutine waits on an [`IrqEvent`] 200 times;
//!   each time another goroutine raises the "device" interrupt (an IPI,
//!   vector [`idt::DEVICE`]) on a CPU chosen round-robin, whose handler
//!   signals the event.
//! - `irq-timer-busy`: every CPU runs a goroutine that yields in a loop
//!   (no CPU is idle) when the APIC timer fires; its handler signals an
//!   event, and the goroutine waiting on it must run and stop the others.
//!   The handler records that no CPU was halted at that moment.
//! - `irq-timer-idle`: the same with every goroutine parked: the handler
//!   finds every CPU halted (waiting in the platform's futexsleep) and
//!   its signal must wake one to run the waiter.
//! - `irq-work`: the device interrupt posts an [`IrqWork`], a short
//!   function an M runs soon on its g0 stack; it unparks a goroutine.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use gokernel::intr::{IrqEvent, IrqWork};
use gokernel::proc::{Parker, gosched};

use crate::cpu::{self, CPUS, ONLINE};
use crate::glue::sched;
use crate::idt;
use crate::scenarios::{Host, Report, run_g};

/// The event the device interrupt signals (mode [`DEV_SIGNAL`]).
static DEV_EVENT: IrqEvent = IrqEvent::new();
/// The event the timer interrupt signals.
static TIMER_EVENT: IrqEvent = IrqEvent::new();
/// The work the device interrupt posts (mode [`DEV_POST`]).
static WORK: IrqWork = IrqWork::new(work);

/// What the device handler does.
static DEV_MODE: AtomicU32 = AtomicU32::new(DEV_SIGNAL);
const DEV_SIGNAL: u32 = 0;
const DEV_POST: u32 = 1;

/// What the timer handler saw: how many CPUs were halted in futexsleep.
static HALTED_AT_TIMER: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Times [`work`] ran, and the goroutine it unparks.
static WORK_RAN: AtomicU32 = AtomicU32::new(0);
static WORK_WAITER: spin::Mutex<Option<Arc<Parker>>> = spin::Mutex::new(None);

/// The device interrupt's handler (interrupt context).
fn on_device() {
    match DEV_MODE.load(Ordering::Relaxed) {
        DEV_SIGNAL => DEV_EVENT.signal(),
        _ => WORK.post(sched()),
    }
}

/// The timer event's handler (interrupt context): note how many CPUs
/// were halted, then signal.
fn on_timer() {
    let halted = CPUS[..ONLINE.load(Ordering::Acquire)]
        .iter()
        .filter(|c| c.waiting_on.load(Ordering::SeqCst) != 0)
        .count();
    HALTED_AT_TIMER.store(halted, Ordering::SeqCst);
    TIMER_EVENT.signal();
}

/// The posted work: on an M's g0, not in the handler.
fn work() {
    WORK_RAN.fetch_add(1, Ordering::SeqCst);
    if let Some(p) = WORK_WAITER.lock().as_ref() {
        p.unpark();
    }
}

const ROUNDS: u32 = 200;

/// `irq-device-wait`: returns the rounds the waiter saw.
fn device_wait(h: Host) -> Option<u32> {
    run_g(h, 60, move || {
        DEV_MODE.store(DEV_SIGNAL, Ordering::SeqCst);
        let seen = Arc::new(AtomicU32::new(0));
        let ack = gokernel::chan::<()>(0);
        let (s, a) = (seen.clone(), ack.clone());
        h.sched
            .go(Box::new(move || {
                for _ in 0..ROUNDS {
                    DEV_EVENT.wait(sched());
                    s.fetch_add(1, Ordering::SeqCst);
                    a.send(()).unwrap();
                }
            }))
            .expect("spawn the waiter");
        let n = ONLINE.load(Ordering::Acquire);
        for i in 0..ROUNDS {
            cpu::raise_device(i as usize % n);
            ack.recv().unwrap();
        }
        seen.load(Ordering::SeqCst)
    })
}

/// Puts a yielding goroutine on every other CPU, each running until
/// `stop` is set; the caller keeps its own CPU busy. A started goroutine
/// stays on its CPU, so spinners are started until each CPU has one (a
/// spinner that finds its CPU covered returns).
pub fn occupy_every_cpu(h: Host, stop: &Arc<AtomicBool>) {
    let n = ONLINE.load(Ordering::Acquire);
    let covered = Arc::new(AtomicUsize::new(1 << cpu::this()));
    let mut tries = 0;
    while covered.load(Ordering::SeqCst) != (1 << n) - 1 && tries < 100_000 {
        let (st, c) = (stop.clone(), covered.clone());
        h.sched
            .go(Box::new(move || {
                let bit = 1 << cpu::this();
                if c.fetch_or(bit, Ordering::SeqCst) & bit == 0 {
                    while !st.load(Ordering::SeqCst) {
                        gosched();
                    }
                }
            }))
            .expect("spawn a spinner");
        gosched();
        tries += 1;
    }
}

/// `irq-timer-busy` (`busy`) or `irq-timer-idle`: arms the timer event
/// on this CPU, with every CPU busy or every CPU idle; returns whether
/// the waiter ran and how many CPUs were halted when the timer fired.
fn timer_wakes(h: Host, busy: bool) -> Option<(bool, usize)> {
    run_g(h, 60, move || {
        HALTED_AT_TIMER.store(usize::MAX, Ordering::SeqCst);
        let stop = Arc::new(AtomicBool::new(false));
        let woke = gokernel::chan::<()>(1);
        let (st, w) = (stop.clone(), woke.clone());
        h.sched
            .go(Box::new(move || {
                TIMER_EVENT.wait(sched());
                st.store(true, Ordering::SeqCst);
                w.send(()).unwrap();
            }))
            .expect("spawn the waiter");
        if busy {
            occupy_every_cpu(h, &stop);
            cpu::timer_event_in(2_000_000);
            // Busy here too, until the waiter has run.
            while !stop.load(Ordering::SeqCst) {
                gosched();
            }
        } else {
            // Everybody parks: this goroutine in the receive.
            cpu::timer_event_in(50_000_000);
        }
        let ran = woke.recv().is_ok();
        (ran, HALTED_AT_TIMER.load(Ordering::SeqCst))
    })
}

/// `irq-work`: the device interrupt posts the work 100 times; returns the
/// runs seen.
fn work_runs(h: Host) -> Option<u32> {
    run_g(h, 60, move || {
        DEV_MODE.store(DEV_POST, Ordering::SeqCst);
        WORK_RAN.store(0, Ordering::SeqCst);
        // SAFETY: on a goroutine.
        let me = unsafe { Parker::current() };
        *WORK_WAITER.lock() = Some(me.clone());
        let n = ONLINE.load(Ordering::Acquire);
        for i in 0..100 {
            cpu::raise_device(i % n);
            while WORK_RAN.load(Ordering::SeqCst) <= i as u32 {
                // SAFETY: our own parker.
                unsafe { me.park() };
            }
        }
        *WORK_WAITER.lock() = None;
        DEV_MODE.store(DEV_SIGNAL, Ordering::SeqCst);
        WORK_RAN.load(Ordering::SeqCst)
    })
}

/// Runs the interrupt scenarios.
pub fn run_all(h: Host, r: &mut Report) {
    cpu::set_device_hook(on_device);
    cpu::set_timer_hook(on_timer);
    let n = ONLINE.load(Ordering::Acquire);

    let seen = device_wait(h);
    r.check(
        "irq-device-wait",
        seen == Some(ROUNDS),
        format_args!(
            "a goroutine waited for the device interrupt (vector {}) {seen:?} times of {ROUNDS}, raised on each of {n} CPUs in turn",
            idt::DEVICE
        ),
    );
    let busy = timer_wakes(h, true);
    r.check(
        "irq-timer-busy",
        busy == Some((true, 0)),
        format_args!(
            "(the woken goroutine ran, CPUs halted when the APIC timer fired) = {busy:?}: every CPU busy"
        ),
    );
    // Every CPU idle: on a slow host a CPU may still be on its way to
    // sleep when the timer fires, so up to 5 tries; each must wake the
    // waiter, and one must find every CPU halted.
    let mut idle = None;
    for _ in 0..5 {
        idle = timer_wakes(h, false);
        let retry = idle.is_some_and(|(ran, halted)| ran && halted != n);
        if !retry {
            break;
        }
    }
    r.check(
        "irq-timer-idle",
        idle == Some((true, n)),
        format_args!(
            "(the woken goroutine ran, CPUs halted when the APIC timer fired) = {idle:?}: every one of {n} CPUs idle"
        ),
    );
    let runs = work_runs(h);
    r.check(
        "irq-work",
        runs == Some(100),
        format_args!(
            "a function posted by the device interrupt ran {runs:?} times of 100, on an M"
        ),
    );
}
