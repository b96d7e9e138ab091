//! The kernel's CPUs: a table indexed by CPU number (0 = the boot CPU,
//! then the APs in the order they arrived), the map from local APIC id to
//! CPU number, and each CPU's timer: one APIC one-shot serves two
//! deadlines, a sleeping CPU's time-out and a scenario's timer event.

use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::{idt, x86};

/// Most CPUs the kernel runs on.
pub const MAX_CPUS: usize = 16;

/// One CPU.
pub struct Cpu {
    /// Its local APIC id (the IPI destination).
    pub apic_id: AtomicU32,
    // glue: begin
    /// The futex address it sleeps on, or 0 (see [`crate::glue`]).
    pub waiting_on: AtomicUsize,
    /// When its sleep times out ([`x86::nanotime`]), or 0.
    pub sleep_deadline: AtomicU64,
    // glue: end
    /// When its timer event is due, or 0.
    pub event_deadline: AtomicU64,
    /// When its next tick is due, or 0 (see [`crate::preempt_scenarios`]).
    pub tick_deadline: AtomicU64,
}

pub static CPUS: [Cpu; MAX_CPUS] = [const {
    Cpu {
        apic_id: AtomicU32::new(0),
        // glue: begin
        waiting_on: AtomicUsize::new(0),
        sleep_deadline: AtomicU64::new(0),
        // glue: end
        event_deadline: AtomicU64::new(0),
        tick_deadline: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// CPUs that have come up (the boot CPU included).
pub static ONLINE: AtomicUsize = AtomicUsize::new(0);

/// APIC id → CPU number.
static APIC_TO_CPU: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];

/// Records the calling CPU as number `n`.
pub fn register(n: usize) {
    let id = x86::apic_id();
    CPUS[n].apic_id.store(id, Ordering::Relaxed);
    APIC_TO_CPU[id as usize].store(n as u8, Ordering::Relaxed);
    ONLINE.fetch_add(1, Ordering::AcqRel);
}

/// The calling CPU's number.
pub fn this() -> usize {
    APIC_TO_CPU[x86::apic_id() as usize].load(Ordering::Relaxed) as usize
}

/// What a timer event or a device interrupt calls (set by a scenario).
static TIMER_HOOK: AtomicUsize = AtomicUsize::new(0);
static DEVICE_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Sets the function a due timer event calls, in the interrupt handler.
pub fn set_timer_hook(f: fn()) {
    TIMER_HOOK.store(f as usize, Ordering::Release);
}

/// Sets the function a [`idt::DEVICE`] interrupt calls, in its handler.
pub fn set_device_hook(f: fn()) {
    DEVICE_HOOK.store(f as usize, Ordering::Release);
}

fn call_hook(h: &AtomicUsize) {
    let f = h.load(Ordering::Acquire);
    if f != 0 {
        // SAFETY: only set_*_hook stores here, from a `fn()`.
        let f: fn() = unsafe { core::mem::transmute(f) };
        f();
    }
}

/// Arms a timer event on the calling CPU `ns` from now: the timer hook
/// runs in the interrupt handler then.
pub fn timer_event_in(ns: u64) {
    let on = x86::irq_save();
    CPUS[this()]
        .event_deadline
        .store(x86::nanotime() + ns, Ordering::Relaxed);
    rearm();
    x86::irq_restore(on);
}

/// Programs the calling CPU's APIC timer for the earlier of its two
/// deadlines (interrupts off).
pub fn rearm() {
    let c = &CPUS[this()];
    let next = [&c.sleep_deadline, &c.event_deadline, &c.tick_deadline]
        .iter()
        .map(|d| d.load(Ordering::Relaxed))
        .filter(|&d| d != 0)
        .min();
    match next {
        Some(d) => x86::timer_oneshot(idt::TIMER, d.saturating_sub(x86::nanotime()).max(1)),
        None => x86::timer_stop(),
    }
}

/// The timer interrupt: run the event if it is due, take a due tick,
/// forget a sleep deadline that has passed (the interrupt has ended that
/// sleep: re-arming for it would fire again at once), re-arm for the rest.
pub fn on_timer() {
    let c = &CPUS[this()];
    let now = x86::nanotime();
    // glue: begin
    let s = c.sleep_deadline.load(Ordering::Relaxed);
    if s != 0 && now >= s {
        c.sleep_deadline.store(0, Ordering::Relaxed);
    }
    // glue: end
    let e = c.event_deadline.load(Ordering::Relaxed);
    if e != 0 && now >= e {
        c.event_deadline.store(0, Ordering::Relaxed);
        call_hook(&TIMER_HOOK);
    }
    let t = c.tick_deadline.load(Ordering::Relaxed);
    if t != 0 && now >= t {
        let next = crate::preempt_scenarios::tick(now);
        c.tick_deadline.store(next, Ordering::Relaxed);
    }
    rearm();
}

/// The device interrupt.
pub fn on_device() {
    call_hook(&DEVICE_HOOK);
}

/// Raises the device interrupt on CPU `n` (an IPI; `n` may be the caller).
pub fn raise_device(n: usize) {
    x86::send_ipi(CPUS[n].apic_id.load(Ordering::Relaxed), idt::DEVICE);
}
