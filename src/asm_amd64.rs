//! The context switches: [`gogo`], [`mcall`], [`systemstack`], the fresh-G
//! entry trampoline [`gostart`], the exit trampoline [`goexit`] and the M
//! start-up save [`mstart1`] (Go's `asm_amd64.s`).
//!
//! These are the only code in gokernel that changes the stack pointer to
//! another stack. Each is an `#[unsafe(naked)]` function whose body is one
//! `naked_asm!`; field offsets come in as `const` operands named after the
//! constants in [`runtime2`](crate::runtime2), the current G is reached
//! with the initial-exec TLS sequence described in [`tls`](crate::tls), and
//! each routine's doc gives its Go signature, its meaning and its register
//! contract.
//!
//! # Registers across a switch
//!
//! Go's ABI has no callee-saved registers, so Go's `gogo` restores only sp,
//! bp and the closure context. gokernel is called from Rust, whose System V
//! ABI makes rbx, rbp and r12–r15 callee-saved: a Rust caller of `mcall`
//! expects them intact when `mcall` "returns". `mcall` therefore stores
//! them in the G's [`Gobuf`] next to sp and pc,
//! and `gogo` loads them back. The suspended G's stack holds only its own
//! frames, and `sched.pc` is the real return address of the `mcall` — what
//! a traceback of a parked G wants.
//!
//! The MXCSR and x87 control words are callee-saved in the System V ABI
//! too, but no switch saves them. Rust code assumes the default
//! floating-point environment everywhere and treats running with a changed
//! one as undefined behaviour (see the docs of `_mm_setcsr`); every G
//! therefore runs with the same control words, and saving them would only
//! make every switch slower (measured on this project's machines: a switch
//! pair about 40 % slower).
//!
//! Every call these routines make into Rust happens with rsp 16-byte
//! aligned at the `call` instruction, as the ABI requires.
//!
//! # Stacks
//!
//! A suspended G (it called `mcall`; `sched` holds its context):
//!
//! ```text
//!  hi  +--------------------------------+
//!      | the G's frames                 |
//!      | ...                            |
//!      | return address of the `call`   |  = sched.pc
//!      | to mcall                       |
//!      +--------------------------------+  <- sched.sp (16-byte aligned:
//!      | free                           |     the caller's rsp before its call)
//!  lo  +--------------------------------+
//!      sched.bp, sched.rbx, sched.r12..r15: the caller's rbp, rbx, r12–r15
//! ```
//!
//! `gogo(&g.sched)` sets rsp to `sched.sp` and jumps to `sched.pc`: the
//! caller continues exactly as if `mcall` had returned.
//!
//! A running G (`m.curg == g`, the TLS slot holds `g`), here inside a
//! `systemstack` call:
//!
//! ```text
//!   G stack                                   g0 stack
//!  hi  +-----------------------------+     +------------------------------+
//!      | the G's frames              |     | mstart's frame               |
//!      | return address into caller  |     +------------------------------+ <- g0.sched.sp
//!      | saved rbp                   |<-+  | return address into          |    (set once)
//!      +-----------------------------+  |  | systemstack                  |
//!      | free                        |  |  | fn's frames ...              |
//!  lo  +-----------------------------+  |  +------------------------------+ <- rsp
//!                                       +-- rbp (CFA = rbp + 16 while on g0)
//! ```
//!
//! A fresh G, as [`gostartcallfn`](crate::proc::gostartcallfn) leaves it:
//!
//! ```text
//!  hi  +--------------------------------+  (16-byte aligned)
//!      | goexit + 1                     |  return address of the G's function
//!      +--------------------------------+  <- sched.sp = hi - 8
//!      | free                           |
//!  lo  +--------------------------------+
//!      sched.pc = gostart, sched.ctxt = &g.startfv, sched.bp = 0
//! ```
//!
//! `gogo` enters [`gostart`] with rsp = hi − 8, as if `goexit` had called
//! it; the function's `ret` lands on `goexit + 1`, which calls
//! `goexit1`.
//!
//! g0's stack: [`mstart1`] records `g0.sched` once, when the M starts, at
//! the point just above its own return address. Every later switch to g0
//! (`mcall`, `systemstack`) starts at `g0.sched.sp`, so g0 never piles up
//! frames, and `gogo(&g0.sched)` returns from `mstart1` into `mstart`,
//! which ends the M.
//!
//! # Unwinding and backtraces
//!
//! Each routine carries DWARF CFI (`.cfi_*`; naked functions get none by
//! default). Inside a `systemstack` function the CFA is computed from rbp,
//! which still points at the frame `systemstack` pushed on the G's stack,
//! so a backtrace walks from g0's frames into the G's. A G's bottom frame,
//! `goexit`, marks the return address undefined, which ends the chain; so
//! does `mcall` once it is on g0 (its function never returns to it).

use core::arch::naked_asm;

use crate::panic::{badgogo, badmcall, badmcall2, badnom, badsystemstack};
use crate::proc::goexit1;
use crate::runtime2::{
    FUNCVAL_FN, FuncVal, G, G_M, G_SCHED, G_SCHED_BP, G_SCHED_PC, G_SCHED_R12, G_SCHED_R13,
    G_SCHED_R14, G_SCHED_R15, G_SCHED_RBX, G_SCHED_SP, GOBUF_BP, GOBUF_CTXT, GOBUF_G, GOBUF_PC,
    GOBUF_R12, GOBUF_R13, GOBUF_R14, GOBUF_R15, GOBUF_RBX, GOBUF_SP, Gobuf, M_CURG, M_G0,
    M_GSIGNAL,
};

/// The size of a stack slot: a return address, a pushed register.
const WORD: usize = core::mem::size_of::<usize>();

/// `func gogo(buf *gobuf)` — restore state from a Gobuf; longjmp.
///
/// Installs `buf.g` as the current G, loads rsp, rbp, rbx, r12–r15 from
/// `buf` and jumps to `buf.pc`. It ends in `jmp`, never `ret`. (Go's
/// `gogo` also loads `buf.ctxt`; here only a fresh G's entry, [`gostart`],
/// needs it, and reads it from `buf` itself.)
///
/// Register contract:
/// - in: rdi = `buf`;
/// - out (at `buf.pc`): rsp = `buf.sp`, rbp/rbx/r12–r15 = the saved values,
///   rdi = `buf`, TLS g = `buf.g`;
/// - clobbered: rax, rdx, flags;
/// - stack: entered on any stack (whatever called it is abandoned); leaves
///   on `buf.g`'s stack at `buf.sp`.
///
/// A `buf.g` of null is a fatal error (`gogo on a Gobuf whose g is null`),
/// except for the `sched` of a goroutine that has no stack yet
/// ([`lazystack`](crate::lazystack)): `buf.g` null and `buf.pc` =
/// `lazystack::stackget_m`. Then, still on the
/// caller's stack (g0's: `execute`) and with TLS g unchanged, it jumps to
/// `stackget_m(G)` (the G whose `sched` `buf` is), which gives the G a
/// stack and comes back here with a complete Gobuf. The test costs the
/// hot path nothing: it lies behind the null check every `gogo` makes.
///
/// # Safety
///
/// `buf` must be a context saved by [`mcall`] or [`mstart1`], or prepared
/// by [`gostartcallfn`](crate::proc::gostartcallfn), for a G whose stack is
/// still alive, and no other M may be running that G or resuming it. The
/// caller's frames are abandoned without running destructors.
#[unsafe(naked)]
#[rustfmt::skip]
pub unsafe extern "C" fn gogo(buf: *const Gobuf) -> ! {
    naked_asm!(
        ".cfi_startproc",
        ".cfi_undefined rip",                          // never returns: nothing to unwind to
        "mov rdx, qword ptr [rdi + {gobuf_g}]",        // rdx = buf.g
        "test rdx, rdx",
        "jz 2f",                                       // no G: a stackless G, or fatal
        "mov rax, qword ptr [rip + __gokernel_g@GOTTPOFF]",
        "mov qword ptr fs:[rax], rdx",                 // setg(buf.g)
        "mov rsp, qword ptr [rdi + {gobuf_sp}]",       // onto the G's stack
        "mov rbp, qword ptr [rdi + {gobuf_bp}]",
        "mov rbx, qword ptr [rdi + {gobuf_rbx}]",      // callee-saved registers
        "mov r12, qword ptr [rdi + {gobuf_r12}]",
        "mov r13, qword ptr [rdi + {gobuf_r13}]",
        "mov r14, qword ptr [rdi + {gobuf_r14}]",
        "mov r15, qword ptr [rdi + {gobuf_r15}]",
        "jmp qword ptr [rdi + {gobuf_pc}]",            // resume
        "2:",
        "lea rax, [rip + {stackget_m}]",
        "cmp qword ptr [rdi + {gobuf_pc}], rax",
        "jne {badgogo}",                               // not a stackless G: fatal
        "sub rdi, {g_sched}",                          // rdi = the G (buf = &G.sched)
        "jmp {stackget_m}",                            // stackget_m(gp), on this stack
        ".cfi_endproc",
        g_sched = const G_SCHED,
        stackget_m = sym crate::lazystack::stackget_m,
        gobuf_g = const GOBUF_G,
        gobuf_sp = const GOBUF_SP,
        gobuf_bp = const GOBUF_BP,
        gobuf_rbx = const GOBUF_RBX,
        gobuf_r12 = const GOBUF_R12,
        gobuf_r13 = const GOBUF_R13,
        gobuf_r14 = const GOBUF_R14,
        gobuf_r15 = const GOBUF_R15,
        gobuf_pc = const GOBUF_PC,
        badgogo = sym badgogo,
    )
}

/// `func mcall(fn func(*g))` — switch to m.g0's stack and call `fn(g)`.
///
/// Saves the caller's context (return pc, sp after the return, rbp, rbx,
/// r12–r15) in `g.sched`, makes g0 the current G, moves to
/// `g0.sched.sp` and calls `fn(g)`. `fn` must never return: it ends in
/// [`gogo`] (usually through `schedule`), and a later `gogo(&g.sched)`
/// resumes the caller as if `mcall` had returned.
///
/// Register contract:
/// - in: rdi = `fn`; TLS g = a user G whose `m` is this thread's M;
/// - out (in `fn`): rdi = the suspended G, rsp = `g0.sched.sp` − 8 (the
///   return address of the call; `g0.sched.sp` is 16-byte aligned),
///   rbp = 0 (ends frame-pointer walks), rbx = the suspended G (for the
///   fatal path), TLS g = g0;
/// - clobbered: everything caller-saved (rax, rcx, rdx, rsi, rdi, r8–r11,
///   flags) and rbx; rbx, rbp, r12–r15 are in `g.sched` and come back with
///   `gogo`;
/// - stack: entered on the G's stack; `fn` runs on g0's stack; control
///   returns to the caller, on the G's stack, only through
///   `gogo(&g.sched)`.
///
/// Misuse is fatal, with a message naming the G: `mcall` on g0
/// (`badmcall`), `fn` returning (`badmcall2`), no M on this thread or
/// a G with no M (`badnom`).
///
/// # Safety
///
/// The current G's `m` must be this thread's M with a valid `g0` whose
/// `sched` was set by [`mstart1`]. `fn` must not return, and must make sure
/// that `g.sched` is used to resume the G at most once.
#[unsafe(naked)]
#[rustfmt::skip]
pub unsafe extern "C" fn mcall(fn_: unsafe extern "C" fn(*mut G)) {
    naked_asm!(
        ".cfi_startproc",
        "mov rax, qword ptr [rip + __gokernel_g@GOTTPOFF]",
        "mov rsi, qword ptr fs:[rax]",                 // rsi = gp = getg()
        "test rsi, rsi",
        "jz 5f",                                       // not an M: fatal
        "mov rdx, qword ptr [rsi + {g_m}]",            // rdx = gp.m
        "test rdx, rdx",
        "jz 5f",                                       // G without an M: fatal
        "mov rcx, qword ptr [rdx + {m_g0}]",           // rcx = g0
        "cmp rsi, rcx",
        "je 2f",                                       // mcall on g0: fatal
        // Save the caller's context in gp.sched.
        "pop r8",                                      // r8 = our return address,
        ".cfi_adjust_cfa_offset -{word}",              // rsp = the caller's sp after return
        ".cfi_register rip, r8",
        "mov qword ptr [rsi + {sched_pc}], r8",
        "mov qword ptr [rsi + {sched_sp}], rsp",
        "mov qword ptr [rsi + {sched_bp}], rbp",
        "mov qword ptr [rsi + {sched_rbx}], rbx",
        "mov qword ptr [rsi + {sched_r12}], r12",
        "mov qword ptr [rsi + {sched_r13}], r13",
        "mov qword ptr [rsi + {sched_r14}], r14",
        "mov qword ptr [rsi + {sched_r15}], r15",
        // Switch to g0 at the point mstart1 recorded.
        "mov qword ptr fs:[rax], rcx",                 // setg(g0)
        "mov rsp, qword ptr [rcx + {sched_sp}]",       // rsp = g0.sched.sp
        ".cfi_undefined rip",                          // g0's frames end here
        "xor ebp, ebp",
        "mov rbx, rsi",                                // keep gp for badmcall2 (saved above)
        "mov rdx, rdi",
        "mov rdi, rsi",
        "call rdx",                                    // fn(gp): must not return
        "mov rdi, rbx",
        "call {badmcall2}",
        "2:",
        "mov rdi, rsi",
        "jmp {badmcall}",
        "5:",
        "mov rdi, rsi",
        "jmp {badnom}",
        ".cfi_endproc",
        g_m = const G_M,
        m_g0 = const M_G0,
        sched_pc = const G_SCHED_PC,
        sched_sp = const G_SCHED_SP,
        sched_bp = const G_SCHED_BP,
        sched_rbx = const G_SCHED_RBX,
        sched_r12 = const G_SCHED_R12,
        sched_r13 = const G_SCHED_R13,
        sched_r14 = const G_SCHED_R14,
        sched_r15 = const G_SCHED_R15,
        word = const WORD,
        badnom = sym badnom,
        badmcall = sym badmcall,
        badmcall2 = sym badmcall2,
    )
}

/// `func systemstack(fn func())` — run `fn` on the system stack (g0's) and
/// come back.
///
/// Calls `(fv.fn_)(fv)`:
/// - directly (a tail jump) when the current G is g0 or gsignal — so
///   `systemstack` inside `systemstack` is a plain call;
/// - on g0's stack, starting at `g0.sched.sp`, when the current G is the
///   M's `curg`: records the G's sp, pc and bp in `g.sched` for
///   tracebacks, makes g0 current, calls, then makes `m.curg` current again
///   and returns on the G's stack;
/// - otherwise it is a fatal error (`badsystemstack`); with no M on the
///   thread or a G with no M, another (`badnom`).
///
/// Register contract:
/// - in: rdi = `fv`;
/// - out: nothing (returns after `fv.fn_` returns);
/// - clobbered: everything caller-saved (rax, rcx, rdx, rsi, rdi, r8–r11,
///   flags, vector registers); rbx, rbp, r12–r15 preserved;
/// - stack: entered and left on the caller's stack; `fv.fn_` runs on g0's
///   stack with rbp pointing at this routine's frame on the G's stack
///   (the CFA while on g0 is rbp + 16).
///
/// # Safety
///
/// `fv` must point to a valid [`FuncVal`] whose code may run on g0: it
/// must return normally (no unwinding out of it) and must not switch Gs
/// (`mcall` from g0 is fatal anyway).
#[unsafe(naked)]
#[rustfmt::skip]
pub unsafe extern "C" fn systemstack(fv: *mut FuncVal) {
    naked_asm!(
        ".cfi_startproc",
        "mov rax, qword ptr [rip + __gokernel_g@GOTTPOFF]",
        "mov rsi, qword ptr fs:[rax]",                 // rsi = gp = getg()
        "test rsi, rsi",
        "jz 5f",                                       // not an M: fatal
        "mov rdx, qword ptr [rsi + {g_m}]",            // rdx = gp.m
        "test rdx, rdx",
        "jz 5f",                                       // G without an M: fatal
        "cmp rsi, qword ptr [rdx + {m_gsignal}]",
        "je 3f",                                       // on gsignal: call directly
        "mov rcx, qword ptr [rdx + {m_g0}]",           // rcx = g0
        "cmp rsi, rcx",
        "je 3f",                                       // on g0: call directly
        "cmp rsi, qword ptr [rdx + {m_curg}]",
        "jne 4f",                                      // not m.curg: fatal
        // A frame on the G's stack that the CFI can find from g0.
        "push rbp",
        ".cfi_adjust_cfa_offset {word}",
        ".cfi_offset rbp, -{two_words}",
        "mov rbp, rsp",
        ".cfi_def_cfa_register rbp",
        "mov qword ptr [rsi + {sched_sp}], rsp",       // for tracebacks of this G
        "mov r8, qword ptr [rsp + {word}]",
        "mov qword ptr [rsi + {sched_pc}], r8",
        "mov qword ptr [rsi + {sched_bp}], rbp",
        // Switch to g0 and call.
        "mov qword ptr fs:[rax], rcx",                 // setg(g0)
        "mov rsp, qword ptr [rcx + {sched_sp}]",       // rsp = g0.sched.sp (aligned)
        "call qword ptr [rdi + {funcval_fn}]",         // fv.fn_(fv)
        // Back to m.curg: re-read everything, fn clobbered it.
        "mov rax, qword ptr [rip + __gokernel_g@GOTTPOFF]",
        "mov rcx, qword ptr fs:[rax]",                 // g0
        "mov rcx, qword ptr [rcx + {g_m}]",
        "mov rcx, qword ptr [rcx + {m_curg}]",         // gp = g0.m.curg
        "mov qword ptr fs:[rax], rcx",                 // setg(gp)
        "mov rsp, rbp",                                // back on the G's stack
        "mov qword ptr [rcx + {sched_sp}], 0",         // not in systemstack any more
        "pop rbp",
        ".cfi_def_cfa rsp, {word}",
        ".cfi_restore rbp",
        "ret",
        "3:",
        "jmp qword ptr [rdi + {funcval_fn}]",          // direct: tail call fv.fn_(fv)
        "4:",
        "mov rdi, rsi",
        "jmp {badsystemstack}",
        "5:",
        "mov rdi, rsi",
        "jmp {badnom}",
        ".cfi_endproc",
        g_m = const G_M,
        m_g0 = const M_G0,
        m_curg = const M_CURG,
        m_gsignal = const M_GSIGNAL,
        sched_sp = const G_SCHED_SP,
        sched_pc = const G_SCHED_PC,
        sched_bp = const G_SCHED_BP,
        funcval_fn = const FUNCVAL_FN,
        word = const WORD,
        two_words = const 2 * WORD,
        badnom = sym badnom,
        badsystemstack = sym badsystemstack,
    )
}

/// The entry trampoline of a fresh G (Go: what `gostartcallfn` arranges;
/// the first instruction a new goroutine runs).
///
/// `gogo` jumps here for a G prepared by
/// [`gostartcallfn`](crate::proc::gostartcallfn). It calls the G's
/// function as if [`goexit`] had called it: `(ctxt.fn_)(ctxt)` with the
/// return address `goexit + 1` already on the stack.
///
/// Register contract:
/// - in: rdi = the G's `sched` (as `gogo` leaves it), whose `ctxt` is a
///   [`FuncVal`]; rsp = hi − 8 with `[rsp] = goexit + 1`; rbp = 0;
/// - out (in the function): rdi = the `FuncVal`, rsp unchanged (≡ 8 mod 16,
///   as at any function entry);
/// - clobbered: rdi;
/// - stack: the G's own, empty but for the return address.
///
/// # Safety
///
/// Only `gogo` may enter it, with the state above.
#[unsafe(naked)]
#[rustfmt::skip]
pub unsafe extern "C" fn gostart() -> ! {
    naked_asm!(
        ".cfi_startproc",
        ".cfi_undefined rip",                          // never on a stack
        "mov rdi, qword ptr [rdi + {gobuf_ctxt}]",     // arg = the FuncVal, sched.ctxt
        "jmp qword ptr [rdi + {funcval_fn}]",          // "called" from goexit
        ".cfi_endproc",
        gobuf_ctxt = const GOBUF_CTXT,
        funcval_fn = const FUNCVAL_FN,
    )
}

/// `func goexit(neverCallThisFunction)` — the return point of every G's
/// function, and its bottom frame.
///
/// Nothing calls it: [`gostartcallfn`](crate::proc::gostartcallfn) plants
/// `goexit + 1` as the return address of a fresh G's function, so when the
/// function returns, execution continues one byte in — past the leading
/// `nop`, so that an unwinder looking up `return address − 1` lands inside
/// `goexit`, whose CFI marks the return address undefined: the chain ends
/// here, cleanly. It then calls `goexit1`, which
/// does not return.
///
/// Register contract:
/// - in: rsp = the G's `stack.hi` (16-byte aligned);
/// - out: never returns;
/// - clobbered: everything;
/// - stack: the G's own, empty.
///
/// # Safety
///
/// Not to be called; only reached by returning from a fresh G's function.
#[unsafe(naked)]
#[rustfmt::skip]
pub unsafe extern "C" fn goexit() -> ! {
    naked_asm!(
        ".cfi_startproc",
        ".cfi_undefined rip",                          // the G's bottom frame
        "nop",                                         // return addresses point past this
        "call {goexit1}",                              // rsp ≡ 0 mod 16 at the call
        "ud2",
        ".cfi_endproc",
        goexit1 = sym goexit1,
    )
}

/// The first thing an M does on its g0: record `g0.sched` once, then run
/// `fv` (Go's `mstart1`: `gp.sched.pc = getcallerpc(); gp.sched.sp =
/// getcallersp()`).
///
/// Saves the caller's context in `buf` (g0's Gobuf): pc = the return
/// address, sp = the caller's sp after the return, rbp, rbx, r12–r15. Then
/// calls `(fv.fn_)(fv)` on the same stack. Control comes back to the
/// caller either when `fv.fn_` returns, or when anything later runs
/// `gogo(buf)` — the M's way out.
///
/// Register contract:
/// - in: rdi = `buf`, rsi = `fv`;
/// - out: returns, with rbx, rbp, r12–r15 as they were on entry (restored
///   either by the callee or from `buf`);
/// - clobbered: everything caller-saved;
/// - stack: entered on g0's stack (the thread's own stack, hosted) and
///   left on it at the same depth; `fv.fn_` runs just below `buf.sp`.
///
/// # Safety
///
/// `buf` must be the `sched` of the g0 this thread has as its current G,
/// and the caller's frame must outlive every use of `buf`: after this
/// returns, `buf` points into a dead frame until the next `mstart1`.
#[unsafe(naked)]
#[rustfmt::skip]
pub unsafe extern "C" fn mstart1(buf: *mut Gobuf, fv: *mut FuncVal) {
    naked_asm!(
        ".cfi_startproc",
        "mov rax, qword ptr [rsp]",
        "mov qword ptr [rdi + {gobuf_pc}], rax",       // pc = our return address
        "lea rax, [rsp + {word}]",     
        "mov qword ptr [rdi + {gobuf_sp}], rax",       // sp = the caller's sp after return
        "mov qword ptr [rdi + {gobuf_bp}], rbp",
        "mov qword ptr [rdi + {gobuf_rbx}], rbx",
        "mov qword ptr [rdi + {gobuf_r12}], r12",
        "mov qword ptr [rdi + {gobuf_r13}], r13",
        "mov qword ptr [rdi + {gobuf_r14}], r14",
        "mov qword ptr [rdi + {gobuf_r15}], r15",
        "sub rsp, {word}",                             // align for the call
        ".cfi_adjust_cfa_offset {word}",
        "mov rdi, rsi",
        "call qword ptr [rsi + {funcval_fn}]",         // fv.fn_(fv)
        "add rsp, {word}",
        ".cfi_adjust_cfa_offset -{word}",
        "ret",
        ".cfi_endproc",
        gobuf_pc = const GOBUF_PC,
        gobuf_sp = const GOBUF_SP,
        gobuf_bp = const GOBUF_BP,
        gobuf_rbx = const GOBUF_RBX,
        gobuf_r12 = const GOBUF_R12,
        gobuf_r13 = const GOBUF_R13,
        gobuf_r14 = const GOBUF_R14,
        gobuf_r15 = const GOBUF_R15,
        funcval_fn = const FUNCVAL_FN,
        word = const WORD,
    )
}
