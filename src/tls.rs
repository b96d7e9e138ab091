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

// ---------------------------------------------------------------------
// TLS blocks for Ms on a freestanding image, and the FS base.

/// The initial image of thread-local storage: the PT_TLS segment, as the
/// linker script's symbols (or the program headers) describe it.
#[derive(Clone, Copy, Debug)]
pub struct TlsTemplate {
    /// Start of the initialised part (`.tdata`).
    pub tdata: *const u8,
    /// Bytes of `.tdata` (p_filesz).
    pub filesz: usize,
    /// Bytes of `.tdata` + `.tbss`, with the padding between them
    /// (p_memsz).
    pub memsz: usize,
    /// Alignment of the segment (p_align); a power of two.
    pub align: usize,
}

// SAFETY: the template is read-only data of the image.
unsafe impl Send for TlsTemplate {}
// SAFETY: as above.
unsafe impl Sync for TlsTemplate {}

/// Bytes reserved for the thread control block at the thread pointer. The
/// x86_64 ABI needs only its first word (the self-pointer at `fs:0`); the
/// rest is spare room an embedder may use.
pub const TCB_SIZE: usize = 64;

/// One thread's TLS block, laid out as x86_64 "variant II" wants:
///
/// ```text
///   base                                   tp = FS base
///    |<----- round_up(memsz, align) ------->|<-- TCB_SIZE -->|
///    | .tdata copy | .tbss zeroed | padding | self-pointer |  |
///    +-------------+--------------+---------+--------------+--+
///                 TLS variables at tp - n                fs:0 == tp
/// ```
///
/// Variables sit below the thread pointer, at the (negative) offsets the
/// linker computed, so `mov r, [rip + sym@GOTTPOFF]; mov r, fs:[r]` finds
/// them. The block is allocated with the global allocator and freed on
/// drop.
pub struct TlsBlock {
    base: *mut u8,
    layout: core::alloc::Layout,
    tp: usize,
}

// SAFETY: a TLS block is plain owned memory; it is handed to the thread
// that will use it.
unsafe impl Send for TlsBlock {}

impl TlsBlock {
    /// Allocates and initialises a block from `t`: copies `.tdata`, zeroes
    /// `.tbss`, stores the TCB self-pointer. `None` if out of memory.
    ///
    /// # Safety
    ///
    /// `t` must describe this image's PT_TLS segment: `t.tdata` readable for
    /// `t.filesz` bytes, `filesz <= memsz`, `align` a power of two.
    pub unsafe fn new(t: &TlsTemplate) -> Option<TlsBlock> {
        let align = t.align.max(16);
        let tls_size = t.memsz.next_multiple_of(align);
        let layout = core::alloc::Layout::from_size_align(tls_size + TCB_SIZE, align).ok()?;
        // SAFETY: the layout has a non-zero size (TCB_SIZE > 0).
        let base = unsafe { alloc::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            return None;
        }
        let tp = base as usize + tls_size;
        // SAFETY: the block is ours and large enough: tdata lands in
        // [tp - memsz', tp) where memsz' = round_up(memsz, align) >= filesz
        // (the linker's variant II offsets), the TCB word at tp.
        unsafe {
            let start = (tp - t.memsz.next_multiple_of(t.align.max(1))) as *mut u8;
            core::ptr::copy_nonoverlapping(t.tdata, start, t.filesz);
            (tp as *mut usize).write(tp);
        }
        Some(TlsBlock { base, layout, tp })
    }

    /// The thread pointer: the value for the FS base.
    pub fn thread_pointer(&self) -> usize {
        self.tp
    }
}

impl Drop for TlsBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the owner drops it
        // only when no thread uses it.
        unsafe { alloc::alloc::dealloc(self.base, self.layout) }
    }
}

/// How a thread's FS base gets set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsBaseMode {
    /// The `wrfsbase` instruction: one instruction, no kernel entry. Needs
    /// CR4.FSGSBASE (Linux ≥ 5.9 sets it for user space and says so in
    /// `AT_HWCAP2` bit 1); without it the instruction raises #UD.
    Wrfsbase,
    /// The platform's privileged path: `arch_prctl(ARCH_SET_FS)` in a Linux
    /// process, `wrmsr` to IA32_FS_BASE (MSR 0xC000_0100) in a ring-0
    /// kernel.
    Fallback,
}

/// `AT_HWCAP2` bit saying user space may use `rd/wrfsbase` (Linux's
/// `HWCAP2_FSGSBASE`).
pub const HWCAP2_FSGSBASE: u64 = 1 << 1;

/// The mode `AT_HWCAP2` allows: [`FsBaseMode::Wrfsbase`] when the kernel
/// enabled FSGSBASE for user space, else [`FsBaseMode::Fallback`].
pub fn fs_base_mode_for(hwcap2: u64) -> FsBaseMode {
    if hwcap2 & HWCAP2_FSGSBASE != 0 {
        FsBaseMode::Wrfsbase
    } else {
        FsBaseMode::Fallback
    }
}

/// Sets this thread's FS base with `wrfsbase`.
///
/// # Safety
///
/// CR4.FSGSBASE must be set (else #UD, SIGILL in a process), and `tp` must
/// be the thread pointer of a TLS block that outlives this thread's use of
/// it: every TLS access, the current G's included, goes through it.
pub unsafe fn wrfsbase(tp: usize) {
    // SAFETY: the contract.
    unsafe { asm!("wrfsbase {}", in(reg) tp, options(nostack, preserves_flags)) }
}

/// Reads this thread's FS base with `rdfsbase`.
///
/// # Safety
///
/// CR4.FSGSBASE must be set (else #UD).
pub unsafe fn rdfsbase() -> usize {
    let v: usize;
    // SAFETY: the contract.
    unsafe { asm!("rdfsbase {}", out(reg) v, options(nostack, nomem, preserves_flags)) };
    v
}

/// The word at `fs:0`: in a TLS block built by [`TlsBlock`], the thread
/// pointer itself.
pub fn fs0() -> usize {
    let v: usize;
    // SAFETY: fs:0 is the TCB self-pointer of this thread's TLS block
    // (glibc's hosted, TlsBlock's freestanding); reading it has no effect.
    unsafe {
        asm!("mov {}, qword ptr fs:[0]", out(reg) v, options(nostack, readonly, preserves_flags))
    };
    v
}

/// The address of this thread's current-G slot (thread pointer plus the
/// slot's TLS offset). Distinct for every thread.
pub fn slot_address() -> usize {
    let off: isize;
    // SAFETY: loads the slot's TLS offset from the GOT (or an immediate
    // after relaxation); no memory is written.
    unsafe {
        asm!(
            "mov {off}, qword ptr [rip + __gokernel_g@GOTTPOFF]",
            off = out(reg) off,
            options(nostack, readonly, preserves_flags),
        )
    };
    fs0().wrapping_add_signed(off)
}
