//! Preemption from the timer interrupt (`gokernel::preempt`): the kernel
//! turns it on for its scheduler, with this kernel's preemptible text (the
//! `.text.preemptible` section, where only the functions marked below
//! live), and a 1 ms tick on the CPU that runs these scenarios.
//!
//! - `preempt-spinner`: a goroutine spins with no scheduling point on
//!   this CPU; this goroutine, on the same CPU, still gets to run and
//!   finish its work (20 rounds of yields), because the spinner is
//!   preempted.
//! - `preempt-registers`: a goroutine loads known values into all 15
//!   general-purpose registers, spins until the timer interrupt has
//!   preempted it (a flag the handler sets for it), and finds every value
//!   intact. (The kernel is soft-float: there is no vector state to check.)
//! - `preempt-disable`: with a [`preempt_disable`] guard held, a goroutine
//!   spins for [`GUARD_TICKS`] ticks (three time slices) and is not
//!   preempted; without it, spinning on, it is.
//!
//! The timer handler calls [`on_timer`], which asks gokernel and, when the
//! preempted goroutine is the one a scenario watches, sets [`WATCHED`].

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use gokernel::preempt::{PreemptConfig, preempt_disable, preemptions};
use gokernel::proc::gosched;

use crate::cpu::{self, CPUS, MAX_CPUS};
use crate::idt::Frame;
use crate::scenarios::{Host, Report, run_g};
use crate::x86;

/// The tick while these scenarios run: 1 ms.
const TICK_NS: u64 = 1_000_000;

/// Ticks the guarded goroutine spins: three 10 ms time slices.
const GUARD_TICKS: u64 = 30;

/// Ticks a goroutine spins at most waiting to be preempted (a failure,
/// not a hang, if preemption does not come).
const PATIENCE_TICKS: u64 = 5_000;

/// Timer ticks taken, by CPU, and whether each CPU ticks.
static TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static TICKING: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// The goroutine whose preemption a scenario waits for, and the flag the
/// handler sets when it preempts it.
static WATCH: AtomicU64 = AtomicU64::new(0);
static WATCHED: AtomicU8 = AtomicU8::new(0);

unsafe extern "C" {
    // From linker/x86_64.ld: the bounds of .text.preemptible*.
    static __preemptible_start: u8;
    static __preemptible_end: u8;
}

/// A tick on this CPU (from [`cpu::on_timer`], interrupts off): counts it
/// and returns the next tick's deadline, or 0 if the CPU stops ticking.
pub fn tick(now: u64) -> u64 {
    let n = cpu::this();
    TICKS[n].fetch_add(1, Ordering::Relaxed);
    if TICKING[n].load(Ordering::Relaxed) {
        now + TICK_NS
    } else {
        0
    }
}

/// Starts (or stops) the tick on the calling CPU.
fn ticking(on: bool) {
    let n = cpu::this();
    TICKING[n].store(on, Ordering::Relaxed);
    if on {
        let irq = x86::irq_save();
        CPUS[n]
            .tick_deadline
            .store(x86::nanotime() + TICK_NS, Ordering::Relaxed);
        cpu::rearm();
        x86::irq_restore(irq);
    }
}

/// The timer interrupt's part (interrupts off, after the EOI).
pub fn on_timer(f: &mut Frame) {
    // glue: begin
    // SAFETY: called by the timer's handler with interrupts off, on the
    // interrupted CPU; `rip` .. `ss` of `f` are the CPU's frame, which
    // isr_common's iretq pops, untouched after this.
    let preempted = unsafe { gokernel::preempt::on_timer_interrupt((&raw mut f.rip).cast()) };
    // glue: end
    if preempted {
        let g = gokernel::tls::getg();
        // SAFETY: on_timer_interrupt preempts only a running goroutine,
        // which is still the current G (it switches out after the iretq).
        if unsafe { (*g).goid() } == WATCH.load(Ordering::Relaxed) {
            WATCHED.store(1, Ordering::Relaxed);
        }
    }
}

/// Turns preemption on for the kernel's scheduler.
fn enable(h: Host) {
    // glue: begin
    let text: &'static [Range<usize>] = Box::leak(Box::new([
        &raw const __preemptible_start as usize..&raw const __preemptible_end as usize,
    ]));
    let cfg = PreemptConfig {
        text,
        slice_ns: gokernel::sysmon::FORCE_PREEMPT_NS,
        save_vector_state: false,
    };
    // SAFETY: .text.preemptible holds only `spin` and `check_registers`
    // below, which take no lock and call nothing; x86_64-unknown-none has
    // no red zone and is soft-float; on_timer calls as required and the
    // TSC clock takes no lock.
    let _ = unsafe { h.sched.enable_preemption(cfg) };
    // glue: end
}

/// Spins with no scheduling point until `stop` is set (true) or this
/// CPU's tick count reaches `until` (false). Preemptible text.
#[inline(never)]
#[unsafe(link_section = ".text.preemptible")]
fn spin(stop: &AtomicU8, ticks: &AtomicU64, until: u64) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) != 0 {
            return true;
        }
        if ticks.load(Ordering::Relaxed) >= until {
            return false;
        }
        core::hint::spin_loop();
    }
}

/// The values [`check_registers`] loads, in the order rax, rbx, rcx, rdx,
/// rsi, rdi, rbp, r8 .. r15.
const VALUES: [u64; 15] = {
    let mut v = [0u64; 15];
    let mut i = 0;
    while i < 15 {
        v[i] = 0x0123_4567_89ab_cdef_u64.rotate_left(4 * i as u32) ^ (i as u64 + 1) << 56;
        i += 1;
    }
    v
};

const W: usize = core::mem::size_of::<u64>();

/// Loads [`VALUES`] into all 15 general-purpose registers, spins until
/// [`WATCHED`] is set, and returns what the registers hold then.
/// Preemptible text.
#[inline(never)]
#[unsafe(link_section = ".text.preemptible")]
fn check_registers() -> [u64; 15] {
    let mut out = [0u64; 15];
    // SAFETY: saves rbx and rbp (which asm! may not name) on the stack and
    // restores them; every other register is declared clobbered; `out` is
    // 15 writable words.
    unsafe {
        core::arch::asm!(
            "push rbx",
            "push rbp",
            "push {out}",
            "mov rax, {v0}",
            "mov rbx, {v1}",
            "mov rcx, {v2}",
            "mov rdx, {v3}",
            "mov rsi, {v4}",
            "mov rdi, {v5}",
            "mov rbp, {v6}",
            "mov r8, {v7}",
            "mov r9, {v8}",
            "mov r10, {v9}",
            "mov r11, {v10}",
            "mov r12, {v11}",
            "mov r13, {v12}",
            "mov r14, {v13}",
            "mov r15, {v14}",
            "2:",
            "pause",
            "cmp byte ptr [rip + {watched}], 0",
            "je 2b",
            "xchg rax, qword ptr [rsp]",               // rax = out; rax's value on the stack
            "mov qword ptr [rax + {o1}], rbx",
            "mov qword ptr [rax + {o2}], rcx",
            "mov qword ptr [rax + {o3}], rdx",
            "mov qword ptr [rax + {o4}], rsi",
            "mov qword ptr [rax + {o5}], rdi",
            "mov qword ptr [rax + {o6}], rbp",
            "mov qword ptr [rax + {o7}], r8",
            "mov qword ptr [rax + {o8}], r9",
            "mov qword ptr [rax + {o9}], r10",
            "mov qword ptr [rax + {o10}], r11",
            "mov qword ptr [rax + {o11}], r12",
            "mov qword ptr [rax + {o12}], r13",
            "mov qword ptr [rax + {o13}], r14",
            "mov qword ptr [rax + {o14}], r15",
            "pop rcx",
            "mov qword ptr [rax], rcx",
            "pop rbp",
            "pop rbx",
            out = in(reg) out.as_mut_ptr(),
            watched = sym WATCHED,
            v0 = const VALUES[0], v1 = const VALUES[1], v2 = const VALUES[2],
            v3 = const VALUES[3], v4 = const VALUES[4], v5 = const VALUES[5],
            v6 = const VALUES[6], v7 = const VALUES[7], v8 = const VALUES[8],
            v9 = const VALUES[9], v10 = const VALUES[10], v11 = const VALUES[11],
            v12 = const VALUES[12], v13 = const VALUES[13], v14 = const VALUES[14],
            o1 = const W, o2 = const 2 * W, o3 = const 3 * W, o4 = const 4 * W,
            o5 = const 5 * W, o6 = const 6 * W, o7 = const 7 * W, o8 = const 8 * W,
            o9 = const 9 * W, o10 = const 10 * W, o11 = const 11 * W,
            o12 = const 12 * W, o13 = const 13 * W, o14 = const 14 * W,
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _, out("r12") _,
            out("r13") _, out("r14") _, out("r15") _,
        );
    }
    out
}

/// Watches the current goroutine: [`WATCHED`] is set when it is preempted.
fn watch_me() {
    WATCHED.store(0, Ordering::Relaxed);
    let g = gokernel::tls::getg();
    // SAFETY: on a goroutine (a scenario's), live while it runs.
    WATCH.store(unsafe { (*g).goid() }, Ordering::Relaxed);
}

/// `preempt-spinner`: (spinner started on this CPU, rounds of work done
/// here, spinner's preemptions).
fn spinner(h: Host) -> Option<(bool, u32, u64)> {
    run_g(h, 60, move || {
        let me = cpu::this();
        ticking(true);
        let stop = Arc::new(AtomicU8::new(0));
        let here = Arc::new(AtomicBool::new(false));
        let tx = gokernel::chan::<u64>(1);
        // A started goroutine stays on its CPU: start spinners until one
        // starts on this one (a spinner elsewhere returns at once).
        let mut tries = 0;
        let mut rounds = 0;
        while !here.load(Ordering::SeqCst) && tries < 1_000 {
            tries += 1;
            let started = Arc::new(AtomicBool::new(false));
            let (st, s, hr, t) = (started.clone(), stop.clone(), here.clone(), tx.clone());
            h.sched
                .go(Box::new(move || {
                    st.store(true, Ordering::SeqCst);
                    if cpu::this() != me {
                        return;
                    }
                    hr.store(true, Ordering::SeqCst);
                    let before = preemptions();
                    spin(&s, &TICKS[me], u64::MAX);
                    t.send(preemptions() - before).unwrap();
                }))
                .expect("spawn a spinner");
            while !started.load(Ordering::SeqCst) {
                gosched();
            }
        }
        // The spinner is on this CPU: each yield here lets it spin until
        // the timer interrupt takes the CPU back.
        if here.load(Ordering::SeqCst) {
            while rounds < 20 {
                gosched();
                rounds += 1;
            }
        }
        stop.store(1, Ordering::SeqCst);
        let n = if here.load(Ordering::SeqCst) {
            tx.recv().unwrap_or(0)
        } else {
            0
        };
        ticking(false);
        (here.load(Ordering::SeqCst), rounds, n)
    })
}

/// `preempt-registers`: (the registers after a preemption, the
/// goroutine's preemptions meanwhile).
fn registers(h: Host) -> Option<([u64; 15], u64)> {
    run_g(h, 60, move || {
        ticking(true);
        watch_me();
        let before = preemptions();
        let regs = check_registers();
        let n = preemptions() - before;
        ticking(false);
        (regs, n)
    })
}

/// `preempt-disable`: (ticks spun under the guard, preemptions under it,
/// preempted once the guard was dropped).
fn disable(h: Host) -> Option<(u64, u64, bool)> {
    run_g(h, 60, move || {
        let me = cpu::this();
        ticking(true);
        watch_me();
        let never = AtomicU8::new(0);
        let before = preemptions();
        let t0 = TICKS[me].load(Ordering::Relaxed);
        {
            let _guard = preempt_disable();
            spin(&never, &TICKS[me], t0 + GUARD_TICKS);
        }
        let spun = TICKS[me].load(Ordering::Relaxed) - t0;
        let under = preemptions() - before;
        let t1 = TICKS[me].load(Ordering::Relaxed);
        let after = spin(&WATCHED, &TICKS[me], t1 + PATIENCE_TICKS);
        ticking(false);
        (spun, under, after)
    })
}

/// Runs the preemption scenarios.
pub fn run_all(h: Host, r: &mut Report) {
    enable(h);
    let s = spinner(h);
    r.check(
        "preempt-spinner",
        s.is_some_and(|(here, rounds, n)| here && rounds == 20 && n >= 1),
        format_args!(
            "(a spinner without scheduling points on this CPU, rounds this goroutine finished beside it, times it was preempted) = {s:?}"
        ),
    );
    let regs = registers(h);
    r.check(
        "preempt-registers",
        regs.is_some_and(|(v, n)| v == VALUES && n >= 1),
        format_args!(
            "all 15 general-purpose registers kept across {:?} preemptions{}",
            regs.map(|(_, n)| n),
            match regs {
                Some((v, _)) if v != VALUES => " (NOT: some changed)",
                _ => "",
            }
        ),
    );
    if let Some((v, _)) = regs
        && v != VALUES
    {
        crate::say!("  registers: {v:#x?}\n  expected:  {VALUES:#x?}");
    }
    let d = disable(h);
    r.check(
        "preempt-disable",
        d.is_some_and(|(spun, under, after)| spun >= GUARD_TICKS && under == 0 && after),
        format_args!(
            "(ticks spun holding a PreemptGuard, preemptions meanwhile, preempted once it was dropped) = {d:?}"
        ),
    );
}
