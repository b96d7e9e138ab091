//! Fatal errors: `throw` and the named sinks the switch code jumps to
//! (Go's `panic.go` `throw`, and `badmcall` / `badmcall2` /
//! `badsystemstack` from `proc.go` / `stubs.go`).
//!
//! A fatal error writes one line, `fatal error: <what> (<which goroutine,
//! which M>)`, and aborts. It does not allocate and does not unwind: it may
//! run on g0 or on a G whose stack is the problem. Hosted, the line goes to
//! stderr with `write(2)` and the process ends with `abort()` (SIGABRT).
//! Freestanding, the line goes to the writer installed with
//! `set_fatal_writer` (built without `std`), then the CPU executes `ud2`.

use core::fmt::Write;

use crate::runtime2::{G, M};
use crate::tls::getg;

/// Formats into a fixed buffer: a fatal message must not allocate.
type Line = heapless::String<512>;

/// Where freestanding fatal messages go.
#[cfg(not(feature = "std"))]
static FATAL_WRITER: core::sync::atomic::AtomicPtr<()> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

/// Installs the function that receives fatal messages on a freestanding
/// build (a serial port, a console). Without one, a fatal error just traps.
#[cfg(not(feature = "std"))]
pub fn set_fatal_writer(write: fn(&[u8])) {
    FATAL_WRITER.store(write as *mut (), core::sync::atomic::Ordering::Release);
}

fn write_out(bytes: &[u8]) {
    #[cfg(feature = "std")]
    {
        let mut rest = bytes;
        while !rest.is_empty() {
            // SAFETY: writes from a live slice to fd 2; a failed write is
            // ignored (there is nowhere else to report it).
            let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                break;
            }
            rest = &rest[n as usize..];
        }
    }
    #[cfg(not(feature = "std"))]
    {
        let p = FATAL_WRITER.load(core::sync::atomic::Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: only set_fatal_writer stores here, from a `fn(&[u8])`.
            let write: fn(&[u8]) = unsafe { core::mem::transmute(p) };
            write(bytes);
        }
    }
}

fn die() -> ! {
    #[cfg(feature = "std")]
    {
        // SAFETY: abort() takes no arguments and does not return.
        unsafe { libc::abort() }
    }
    #[cfg(not(feature = "std"))]
    {
        // SAFETY: ud2 raises #UD; there is nothing to preserve.
        unsafe { core::arch::asm!("ud2", options(noreturn, nostack)) }
    }
}

/// Describes a G for a message: `goroutine 7 (m 2)`, `g0 (m 2)`.
fn describe(line: &mut Line, gp: *const G) {
    if gp.is_null() {
        let _ = line.push_str("no current goroutine");
        return;
    }
    // SAFETY: gp is a live G (the current one, or one the caller holds);
    // only plain fields are read.
    let (goid, mp) = unsafe { ((*gp).goid(), (*gp).m) };
    // SAFETY: a G's m is null or a live M.
    let mid = if mp.is_null() {
        -1
    } else {
        unsafe { (*mp).id }
    };
    let is_g0 = !mp.is_null() && {
        // SAFETY: mp is a live M.
        unsafe { core::ptr::eq((*mp).g0, gp) }
    };
    if is_g0 {
        let _ = write!(line, "g0 of m {mid}");
    } else if mid >= 0 {
        let _ = write!(line, "goroutine {goid} on m {mid}");
    } else {
        let _ = write!(line, "goroutine {goid}");
    }
}

/// A fatal error raised on an M's own stack (g0 or the signal stack) by
/// code run there for someone: names the goroutine of a `systemstack`
/// closure (the M's current goroutine), or g0 of the M when there is none
/// (an `after_func` callback run by the scheduler).
#[cold]
pub(crate) fn throw_on_system_stack(msg: &str) -> ! {
    let gp = getg();
    // SAFETY: a non-null current G has a live M, whose curg is null or a
    // live G (the one that called systemstack).
    let curg = unsafe {
        if gp.is_null() || (*gp).m.is_null() {
            core::ptr::null()
        } else {
            (*(*gp).m).curg.cast_const()
        }
    };
    throw_g(msg, if curg.is_null() { gp } else { curg })
}

/// Reports a fatal runtime error and aborts (Go's `throw`). The message
/// names the current goroutine and M.
#[cold]
pub fn throw(msg: &str) -> ! {
    throw_g(msg, getg())
}

/// Writes `error: <msg> (<goroutine>)` to the fatal-error output and
/// returns: for errors the runtime survives.
#[cold]
#[cfg(feature = "std")]
pub(crate) fn report_g(msg: &str, gp: *const G) {
    write_line("error: ", msg, gp);
}

/// Like [`throw`], naming `gp` as the goroutine at fault. `gp` must be
/// null or a live G (its id and M are read): crate-private, since a safe
/// caller could pass any pointer.
///
/// ```compile_fail,E0603
/// // Would read a G at address 8.
/// gokernel::panic::throw_g("boom", 8 as *const gokernel::runtime2::G);
/// ```
#[cold]
pub(crate) fn throw_g(msg: &str, gp: *const G) -> ! {
    write_line("fatal error: ", msg, gp);
    die()
}

/// Writes `<prefix><msg> (<goroutine>)` and a newline.
fn write_line(prefix: &str, msg: &str, gp: *const G) {
    let mut line = Line::new();
    let _ = line.push_str(prefix);
    let _ = line.push_str(msg);
    let _ = line.push_str(" (");
    describe(&mut line, gp);
    let _ = line.push_str(")\n");
    write_out(line.as_bytes());
}

/// Sink for `mcall` from g0: there is no user G to suspend.
/// Called by [`mcall`](crate::asm_amd64::mcall) with the offending G in rdi.
pub(crate) extern "C" fn badmcall(gp: *mut G) -> ! {
    throw_g(
        "mcall called on g0: mcall only suspends a user goroutine",
        gp,
    )
}

/// Sink for an `mcall` function that returned instead of switching away.
/// Called by [`mcall`](crate::asm_amd64::mcall) with the suspended G.
pub(crate) extern "C" fn badmcall2(gp: *mut G) -> ! {
    throw_g(
        "mcall function returned: it must end in gogo or schedule",
        gp,
    )
}

/// Sink for `systemstack` from a G that is neither g0, gsignal nor the M's
/// current G. Called by [`systemstack`](crate::asm_amd64::systemstack).
pub(crate) extern "C" fn badsystemstack(gp: *mut G) -> ! {
    let mut line = Line::new();
    // SAFETY: gp is the current G (its m was read by the asm).
    let mp: *mut M = unsafe { (*gp).m };
    // SAFETY: the asm only jumps here after reading a non-null M.
    let curg = unsafe { (*mp).curg };
    let cur = if curg.is_null() {
        0
    } else {
        // SAFETY: m.curg is null or a live G.
        unsafe { (*curg).goid() }
    };
    let _ = write!(
        line,
        "systemstack called from a goroutine that is not its M's current goroutine (m.curg is goroutine {cur})"
    );
    throw_g(&line, gp)
}

/// Sink for `mcall` or `systemstack` when the current G is null (the
/// thread is not an M) or has no M.
pub(crate) extern "C" fn badnom(gp: *mut G) -> ! {
    if gp.is_null() {
        throw_g(
            "mcall or systemstack called on a thread that is not a gokernel M",
            gp,
        )
    }
    throw_g(
        "mcall or systemstack called from a goroutine that has no M (g.m is null)",
        gp,
    )
}

/// Sink for `gogo` on a Gobuf with no G.
pub(crate) extern "C" fn badgogo() -> ! {
    throw("gogo on a Gobuf whose g is null")
}

/// Which check caught a goroutine running off its stack, and where: what
/// [`stackoverflow_at`] reports.
/// Hosted only but the switch check: the others come from the signal
/// handler.
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub(crate) enum Overflow {
    /// The soft guard below the stack was found written when the G
    /// switched out (stacks without a guard page).
    SoftGuardAtSwitch,
    /// A fault at `addr` inside the `PROT_NONE` guard page below the stack.
    GuardPage {
        /// The faulting address.
        addr: usize,
    },
    /// A fault elsewhere, and the soft guard below the stack was found
    /// written.
    SoftGuardAtFault {
        /// `"segmentation fault"` or `"bus error"`.
        what: &'static str,
        /// The faulting address.
        addr: usize,
    },
    /// A fault at `addr`, outside the guard page, with the stack pointer
    /// `sp` below the stack (in its guard page or beyond).
    SpBelowStack {
        /// `"segmentation fault"` or `"bus error"`.
        what: &'static str,
        /// The faulting address.
        addr: usize,
        /// The stack pointer at the fault.
        sp: usize,
        /// The G's stack has a `PROT_NONE` guard page (else a soft guard).
        guard_page: bool,
    },
}

/// Reports that `gp` ran off its stack and aborts. `fault` is 0 for the
/// soft-guard check at a switch ([`Overflow::SoftGuardAtSwitch`]), which is
/// the only caller that does not say more.
#[cold]
pub(crate) fn stackoverflow(gp: *const G, fault: usize) -> ! {
    debug_assert_eq!(fault, 0, "faults are reported with stackoverflow_at");
    stackoverflow_at(gp, Overflow::SoftGuardAtSwitch)
}

/// Reports that `gp` ran off its stack, saying which check fired and
/// where, and aborts:
///
/// - `fatal error: stack overflow: goroutine N faulted at A in the guard
///   page below its stack [lo, hi) of S bytes (goroutine N on m M)`;
/// - `fatal error: stack overflow: goroutine N's soft guard below its stack
///   [lo, hi) of S bytes was written (checked at switch) (…)`, or
///   `(found at a segmentation fault at A)`;
/// - `fatal error: stack overflow: goroutine N's stack pointer P is below
///   its stack [lo, hi) of S bytes; segmentation fault at A (not in
///   goroutine N's guard page [lo - 4096, lo)) (…)`.
#[cold]
pub(crate) fn stackoverflow_at(gp: *const G, how: Overflow) -> ! {
    let mut msg = Line::new();
    // SAFETY: gp is a live G (the one that overflowed).
    let (goid, st) = unsafe { ((*gp).goid(), (*gp).stack) };
    let stack = StackFmt(st.lo, st.hi);
    let _ = match how {
        Overflow::GuardPage { addr } => write!(
            msg,
            "stack overflow: goroutine {goid} faulted at {addr:#x} in the guard page below its stack {stack}"
        ),
        Overflow::SoftGuardAtSwitch => write!(
            msg,
            "stack overflow: goroutine {goid}'s soft guard below its stack {stack} was written (checked at switch)"
        ),
        Overflow::SoftGuardAtFault { what, addr } => write!(
            msg,
            "stack overflow: goroutine {goid}'s soft guard below its stack {stack} was written (found at a {what} at {addr:#x})"
        ),
        Overflow::SpBelowStack {
            what,
            addr,
            sp,
            guard_page,
        } => write!(
            msg,
            "stack overflow: goroutine {goid}'s stack pointer {sp:#x} is below its stack {stack}; \
             {what} at {addr:#x} (not in goroutine {goid}'s {}guard page [{:#x}, {:#x}))",
            if guard_page { "" } else { "soft " },
            st.lo.wrapping_sub(crate::stack::PAGE_SIZE),
            st.lo
        ),
    };
    throw_g(&msg, gp)
}

/// `[lo, hi) of S bytes`.
struct StackFmt(usize, usize);

impl core::fmt::Display for StackFmt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x}) of {} bytes",
            self.0,
            self.1,
            self.1.wrapping_sub(self.0)
        )
    }
}

/// Runs a G's function. Unwinding cannot cross the entry trampoline, so a
/// panic that reaches here ends the process with a fatal error naming the
/// goroutine (the panic hook has already printed the message).
///
/// A scheduler built to report instead (`Builder::report_go_panics`) prints
/// one line naming the goroutine and lets it end; the process goes on.
#[cfg(feature = "std")]
#[inline]
pub(crate) fn run_catching(gp: *mut G) {
    // SAFETY: gp is the running G; only it touches its startfn now.
    let run = || unsafe { (*gp).startfn.run() };
    match std::panic::catch_unwind(core::panic::AssertUnwindSafe(run)) {
        Ok(true) => return,
        Ok(false) => throw_g("goroutine started without a function", gp),
        // Unwound by its runtime's teardown: it ends quietly.
        Err(p) if p.is::<crate::teardown::RuntimeDropped>() => return,
        Err(_) => {}
    }
    // SAFETY: gp is the running G; its scheduler (if any) outlives it.
    let report = unsafe { !(*gp).rt.is_null() && (*(*gp).rt).report_panics };
    if report {
        report_g(
            "a goroutine panicked (message above); it ended, the runtime goes on",
            gp,
        );
        return;
    }
    throw_g(
        "a goroutine panicked (message above); a panic cannot unwind out of a goroutine",
        gp,
    );
}

/// Runs a G's function. Without `std` there is no unwinding to catch: a
/// panic goes to the embedder's panic handler.
#[cfg(not(feature = "std"))]
#[inline]
pub(crate) fn run_catching(gp: *mut G) {
    // SAFETY: gp is the running G; only it touches its startfn now.
    if !unsafe { (*gp).startfn.run() } {
        throw_g("goroutine started without a function", gp);
    }
}
