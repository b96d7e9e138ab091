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
//!   general-purpose registers and the 16 XMM registers, spins until the
//!   timer interrupt has preempted it (a flag the handler sets for it),
//!   and finds every value intact, though a goroutine beside it on its CPU
//!   loads other values into the XMM registers whenever it runs. The
//!   kernel's compiled code is soft-float; the scenario's CPU enables SSE
//!   for the inline assembly, and the kernel asks gokernel to save the
//!   vector state (`fxsave64`).
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
    // interrupted CPU, whose TLS block is set up before interrupts are
    // enabled (glue::cpu_init, then join); `rip` .. `ss` of `f` are the
    // CPU's frame, which isr_common's iretq pops, untouched after this.
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
    let text: &'static [Range<usize>] = Box::leak(Box::new([Range {
        start: &raw const __preemptible_start as usize,
        end: &raw const __preemptible_end as usize,
    }]));
    let cfg = PreemptConfig {
        text,
        slice_ns: gokernel::sysmon::FORCE_PREEMPT_NS,
        save_vector_state: true,
    };
    // SAFETY: .text.preemptible holds only `spin` and `check_registers`
    // below, which take no lock and call nothing; x86_64-unknown-none has
    // no red zone; the vector state is saved (the scenarios use SSE);
    // on_timer calls as required and the TSC clock takes no lock.
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

/// The values [`check_registers`] loads into xmm0 .. xmm15 (two words
/// each), and what the clobbering goroutine loads.
static XMM: [u64; 32] = xmm_values(0x5a5a_0f0f_3c3c_9696);
static XMM_GARBAGE: [u64; 32] = xmm_values(0xdead_beef_0bad_f00d);

const fn xmm_values(seed: u64) -> [u64; 32] {
    let mut v = [0u64; 32];
    let mut i = 0;
    while i < 32 {
        v[i] = seed.rotate_left(3 * i as u32) ^ i as u64;
        i += 1;
    }
    v
}

const W: usize = core::mem::size_of::<u64>();
/// Bytes of an XMM register.
const X: usize = 2 * W;

/// What [`check_registers`] returns: the 15 GPRs, then xmm0 .. xmm15.
type Regs = [u64; 15 + 32];

/// Loads [`VALUES`] into all 15 general-purpose registers and [`XMM`]
/// into the 16 XMM registers, spins until [`WATCHED`] is set, and returns
/// what the registers hold then. Preemptible text. The CPU must have
/// SSE enabled.
#[inline(never)]
#[unsafe(link_section = ".text.preemptible")]
fn check_registers() -> Regs {
    let mut out: Regs = [0; 15 + 32];
    // SAFETY: saves rbx and rbp (which asm! may not name) on the stack and
    // restores them; every other GPR is declared clobbered; the XMM
    // registers cannot be declared on this soft-float target, where no
    // compiled code uses them; `out` is 47 writable words.
    unsafe {
        core::arch::asm!(
            "push rbx",
            "push rbp",
            "push {out}",
            "movdqu xmm0, xmmword ptr [rip + {xmm}]",
            "movdqu xmm1, xmmword ptr [rip + {xmm} + {x1}]",
            "movdqu xmm2, xmmword ptr [rip + {xmm} + {x2}]",
            "movdqu xmm3, xmmword ptr [rip + {xmm} + {x3}]",
            "movdqu xmm4, xmmword ptr [rip + {xmm} + {x4}]",
            "movdqu xmm5, xmmword ptr [rip + {xmm} + {x5}]",
            "movdqu xmm6, xmmword ptr [rip + {xmm} + {x6}]",
            "movdqu xmm7, xmmword ptr [rip + {xmm} + {x7}]",
            "movdqu xmm8, xmmword ptr [rip + {xmm} + {x8}]",
            "movdqu xmm9, xmmword ptr [rip + {xmm} + {x9}]",
            "movdqu xmm10, xmmword ptr [rip + {xmm} + {x10}]",
            "movdqu xmm11, xmmword ptr [rip + {xmm} + {x11}]",
            "movdqu xmm12, xmmword ptr [rip + {xmm} + {x12}]",
            "movdqu xmm13, xmmword ptr [rip + {xmm} + {x13}]",
            "movdqu xmm14, xmmword ptr [rip + {xmm} + {x14}]",
            "movdqu xmm15, xmmword ptr [rip + {xmm} + {x15}]",
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
            "movdqu xmmword ptr [rax + {xo}], xmm0",
            "movdqu xmmword ptr [rax + {xo} + {x1}], xmm1",
            "movdqu xmmword ptr [rax + {xo} + {x2}], xmm2",
            "movdqu xmmword ptr [rax + {xo} + {x3}], xmm3",
            "movdqu xmmword ptr [rax + {xo} + {x4}], xmm4",
            "movdqu xmmword ptr [rax + {xo} + {x5}], xmm5",
            "movdqu xmmword ptr [rax + {xo} + {x6}], xmm6",
            "movdqu xmmword ptr [rax + {xo} + {x7}], xmm7",
            "movdqu xmmword ptr [rax + {xo} + {x8}], xmm8",
            "movdqu xmmword ptr [rax + {xo} + {x9}], xmm9",
            "movdqu xmmword ptr [rax + {xo} + {x10}], xmm10",
            "movdqu xmmword ptr [rax + {xo} + {x11}], xmm11",
            "movdqu xmmword ptr [rax + {xo} + {x12}], xmm12",
            "movdqu xmmword ptr [rax + {xo} + {x13}], xmm13",
            "movdqu xmmword ptr [rax + {xo} + {x14}], xmm14",
            "movdqu xmmword ptr [rax + {xo} + {x15}], xmm15",
            "pop rbp",
            "pop rbx",
            out = in(reg) out.as_mut_ptr(),
            watched = sym WATCHED,
            xmm = sym XMM,
            xo = const 15 * W,
            x1 = const X, x2 = const 2 * X, x3 = const 3 * X, x4 = const 4 * X,
            x5 = const 5 * X, x6 = const 6 * X, x7 = const 7 * X, x8 = const 8 * X,
            x9 = const 9 * X, x10 = const 10 * X, x11 = const 11 * X,
            x12 = const 12 * X, x13 = const 13 * X, x14 = const 14 * X,
            x15 = const 15 * X,
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

/// Loads [`XMM_GARBAGE`] into the 16 XMM registers (SSE enabled).
fn clobber_xmm() {
    // SAFETY: reads a static; the XMM registers are not the compiler's
    // on this soft-float target (see check_registers).
    unsafe {
        core::arch::asm!(
            "movdqu xmm0, xmmword ptr [rip + {g}]",
            "movdqu xmm1, xmmword ptr [rip + {g} + {x1}]",
            "movdqu xmm2, xmmword ptr [rip + {g} + {x2}]",
            "movdqu xmm3, xmmword ptr [rip + {g} + {x3}]",
            "movdqu xmm4, xmmword ptr [rip + {g} + {x4}]",
            "movdqu xmm5, xmmword ptr [rip + {g} + {x5}]",
            "movdqu xmm6, xmmword ptr [rip + {g} + {x6}]",
            "movdqu xmm7, xmmword ptr [rip + {g} + {x7}]",
            "movdqu xmm8, xmmword ptr [rip + {g} + {x8}]",
            "movdqu xmm9, xmmword ptr [rip + {g} + {x9}]",
            "movdqu xmm10, xmmword ptr [rip + {g} + {x10}]",
            "movdqu xmm11, xmmword ptr [rip + {g} + {x11}]",
            "movdqu xmm12, xmmword ptr [rip + {g} + {x12}]",
            "movdqu xmm13, xmmword ptr [rip + {g} + {x13}]",
            "movdqu xmm14, xmmword ptr [rip + {g} + {x14}]",
            "movdqu xmm15, xmmword ptr [rip + {g} + {x15}]",
            g = sym XMM_GARBAGE,
            x1 = const X, x2 = const 2 * X, x3 = const 3 * X, x4 = const 4 * X,
            x5 = const 5 * X, x6 = const 6 * X, x7 = const 7 * X, x8 = const 8 * X,
            x9 = const 9 * X, x10 = const 10 * X, x11 = const 11 * X,
            x12 = const 12 * X, x13 = const 13 * X, x14 = const 14 * X,
            x15 = const 15 * X,
            options(readonly, nostack, preserves_flags),
        );
    }
}

/// Starts a goroutine running `body` on this CPU: a started goroutine
/// stays on its CPU, so goroutines are started until one starts here (one
/// that starts elsewhere returns at once). Returns whether one did.
fn go_here(h: Host, body: impl Fn() + Send + Sync + 'static) -> bool {
    let me = cpu::this();
    let here = Arc::new(AtomicBool::new(false));
    let body = Arc::new(body);
    for _ in 0..1_000 {
        let started = Arc::new(AtomicBool::new(false));
        let (st, hr, b) = (started.clone(), here.clone(), body.clone());
        h.sched
            .go(Box::new(move || {
                let on_me = cpu::this() == me;
                hr.fetch_or(on_me, Ordering::SeqCst);
                st.store(true, Ordering::SeqCst);
                if on_me {
                    b();
                }
            }))
            .expect("spawn a goroutine");
        while !started.load(Ordering::SeqCst) {
            gosched();
        }
        if here.load(Ordering::SeqCst) {
            return true;
        }
    }
    false
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
        let done = gokernel::chan::<u64>(1);
        let (s, d) = (stop.clone(), done.clone());
        let here = go_here(h, move || {
            let before = preemptions();
            spin(&s, &TICKS[me], u64::MAX);
            d.send(preemptions() - before).unwrap();
        });
        // The spinner is on this CPU: each yield here lets it spin until
        // the timer interrupt takes the CPU back.
        let mut rounds = 0;
        while here && rounds < 20 {
            gosched();
            rounds += 1;
        }
        stop.store(1, Ordering::SeqCst);
        let n = if here { done.recv().unwrap_or(0) } else { 0 };
        ticking(false);
        (here, rounds, n)
    })
}

/// `preempt-registers`: (the registers after a preemption, the
/// goroutine's preemptions meanwhile).
fn registers(h: Host) -> Option<(Regs, u64)> {
    run_g(h, 60, move || {
        x86::enable_sse(); // this CPU's: the goroutine stays on it
        ticking(true);
        // Beside it, a goroutine that loads other values into the XMM
        // registers every time it runs.
        let stop = Arc::new(AtomicU8::new(0));
        let done = gokernel::chan::<()>(1);
        let (s, d) = (stop.clone(), done.clone());
        let here = go_here(h, move || {
            while s.load(Ordering::SeqCst) == 0 {
                clobber_xmm();
                gosched();
            }
            d.send(()).unwrap();
        });
        watch_me();
        let before = preemptions();
        let regs = check_registers();
        let n = preemptions() - before;
        stop.store(1, Ordering::SeqCst);
        if here {
            let _ = done.recv();
        }
        ticking(false);
        (regs, if here { n } else { 0 })
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
    let want: Regs = core::array::from_fn(|i| if i < 15 { VALUES[i] } else { XMM[i - 15] });
    r.check(
        "preempt-registers",
        regs.is_some_and(|(v, n)| v == want && n >= 1),
        format_args!(
            "all 15 general-purpose and 16 XMM registers kept across {:?} preemptions, beside an XMM-clobbering goroutine{}",
            regs.map(|(_, n)| n),
            match regs {
                Some((v, _)) if v != want => " (NOT: some changed)",
                _ => "",
            }
        ),
    );
    if let Some((v, _)) = regs
        && v != want
    {
        crate::say!("  registers: {v:#x?}\n  expected:  {want:#x?}");
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
