//! The current G: one 8-byte thread-local slot reached through FS
//! (Go's `get_tls` / `g(CX)`).
//!
//! The slot, [`TLS_G_SYMBOL`], is defined below in `global_asm!` in
//! `.tbss`, so it exists once per thread: in each hosted thread's glibc TLS
//! block, and in each M's TLS block on the freestanding image. It is read
//! and written with the initial-exec sequence
//!
//! ```text
//! mov r, qword ptr [rip + __gokernel_g@GOTTPOFF]   ; r = slot's offset from the thread pointer
//! mov r, qword ptr fs:[r]                          ; r = *(fs_base + offset)
//! ```
//!
//! which works the same hosted and bare-metal: the linker relaxes the first
//! load to `mov r, imm` in an executable, and keeps the GOT load in a shared
//! object loaded with `dlopen` (the local-exec form would not link there).
//! The switch code in [`asm_amd64`](crate::asm_amd64) uses the same two
//! instructions, spelled with the same symbol.
//!
//! [`getg`] reads the slot every time it is called: its asm is not `pure`,
//! so the compiler cannot reuse an earlier value across a call that may have
//! switched this G to another M. Code must not cache the result either.

use core::arch::{asm, global_asm};

use crate::runtime2::G;

/// The symbol of the TLS slot that holds the current G.
pub const TLS_G_SYMBOL: &str = "__gokernel_g";

// The slot itself: 8 zeroed bytes of thread-local storage. `@tls_object`
// makes it an STT_TLS symbol, so the linker resolves GOTTPOFF against it.
global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".p2align 3",
    ".globl __gokernel_g",
    ".type __gokernel_g, @tls_object",
    ".size __gokernel_g, 8",
    "__gokernel_g:",
    ".zero 8",
    ".popsection",
);

/// Returns the current G: the user G this thread's M is running, its g0 on
/// the scheduling stack, or null on a thread that is not an M (Go's
/// `getg`).
///
/// Re-read it after anything that may switch (`mcall`, `gosched`, a park):
/// the G may resume on another M, whose slot is another.
#[inline(always)]
pub fn getg() -> *mut G {
    let gp: *mut G;
    // SAFETY: reads this thread's slot through FS with the initial-exec
    // sequence. The slot is 8 aligned bytes of TLS that always exist, so
    // the read is in bounds. Not `pure`: every call re-reads.
    unsafe {
        asm!(
            "mov {gp}, qword ptr [rip + __gokernel_g@GOTTPOFF]",
            "mov {gp}, qword ptr fs:[{gp}]",
            gp = out(reg) gp,
            options(nostack, readonly, preserves_flags),
        );
    }
    gp
}

/// Sets the current G (Go's `setg`).
///
/// # Safety
///
/// `gp` must be null or a G that this thread is about to run as the current
/// G of its M: the switch code trusts the slot (`mcall` reads `g.m` through
/// it). Only the runtime's own M start-up and the switch code change it.
#[inline(always)]
pub unsafe fn setg(gp: *mut G) {
    // SAFETY: writes this thread's 8-byte slot through FS; the caller
    // guarantees the value is one the switch code may trust.
    unsafe {
        asm!(
            "mov {tmp}, qword ptr [rip + __gokernel_g@GOTTPOFF]",
            "mov qword ptr fs:[{tmp}], {gp}",
            tmp = out(reg) _,
            gp = in(reg) gp,
            options(nostack, preserves_flags),
        );
    }
}
