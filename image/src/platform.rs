//! gokernel's `Platform` over raw Linux system calls: Ms are threads made
//! with `clone(2)` (own stack, own TLS block via `CLONE_SETTLS`), idle Ms
//! sleep on `futex(2)`.
//!
//! In CPU mode (`--cpus`) the platform starts no threads: `newosproc`
//! fails, `starts_threads` is false, and the Ms are "CPUs" — threads the
//! image starts itself, each calling `gokernel::cpu::join` (see
//! `cpus.rs`).

use core::arch::naked_asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use gokernel::platform::{NewOsProcError, Platform};
use gokernel::runtime2::M;
use gokernel::tls::{FsBaseMode, TlsBlock, fs0, slot_address};

use crate::sys::*;

/// Stack of an M's thread (its g0 stack).
const M_STACK: usize = 256 * 1024;

/// Most Ms the image records for its per-M checks.
pub const MAX_MS: usize = 16;

/// What each M saw when it started: its thread pointer, `fs:0`, the FS
/// base as the kernel reports it, and the address of its current-G slot.
#[derive(Default)]
pub struct MRecord {
    pub tp: AtomicUsize,
    pub fs0: AtomicUsize,
    pub fs_base: AtomicUsize,
    pub slot: AtomicUsize,
}

pub static M_RECORDS: [MRecord; MAX_MS] = [const {
    MRecord {
        tp: AtomicUsize::new(0),
        fs0: AtomicUsize::new(0),
        fs_base: AtomicUsize::new(0),
        slot: AtomicUsize::new(0),
    }
}; MAX_MS];
pub static NRECORDS: AtomicUsize = AtomicUsize::new(0);

/// The platform: stateless but for the FS mode chosen at start.
pub struct Image;

pub static IMAGE: Image = Image;

/// 0 = wrfsbase, 1 = fallback (arch_prctl).
static FS_MODE: AtomicU32 = AtomicU32::new(1);

/// CPU mode: the platform starts no threads.
static CPU_MODE: AtomicBool = AtomicBool::new(false);
/// Calls of `newosproc` (in CPU mode there must be none).
pub static NEWOSPROC_CALLS: AtomicU32 = AtomicU32::new(0);
/// `futexsleep` calls made by threads that are neither Ms (no current
/// G) nor the main thread.
pub static NONM_SLEEPS: AtomicU32 = AtomicU32::new(0);
/// The main thread's id.
pub static MAIN_TID: AtomicUsize = AtomicUsize::new(0);

pub fn set_cpu_mode(on: bool) {
    CPU_MODE.store(on, Ordering::Relaxed);
}

pub fn cpu_mode() -> bool {
    CPU_MODE.load(Ordering::Relaxed)
}

pub fn set_fs_mode(m: FsBaseMode) {
    FS_MODE.store(u32::from(m == FsBaseMode::Fallback), Ordering::Relaxed);
}

pub fn fs_mode() -> FsBaseMode {
    if FS_MODE.load(Ordering::Relaxed) == 0 {
        FsBaseMode::Wrfsbase
    } else {
        FsBaseMode::Fallback
    }
}

/// Sets this thread's FS base in the chosen mode.
///
/// # Safety
///
/// `tp` is the thread pointer of a TLS block that outlives the thread; in
/// wrfsbase mode the CPU and kernel allow it (AT_HWCAP2 checked at start).
pub unsafe fn set_fs(tp: usize) {
    match fs_mode() {
        // SAFETY: the contract.
        FsBaseMode::Wrfsbase => unsafe { gokernel::tls::wrfsbase(tp) },
        FsBaseMode::Fallback => {
            // SAFETY: the contract.
            let r = unsafe { arch_set_fs(tp) };
            if r != 0 {
                gokernel::panic::throw("arch_prctl(ARCH_SET_FS) failed");
            }
        }
    }
}

/// Records what this thread sees through FS, for the per-M checks.
pub fn record_m(tp: usize) {
    let i = NRECORDS.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = M_RECORDS.get(i) {
        r.tp.store(tp, Ordering::Relaxed);
        r.fs0.store(fs0(), Ordering::Relaxed);
        r.fs_base.store(arch_get_fs(), Ordering::Relaxed);
        r.slot.store(slot_address(), Ordering::Release);
    }
}

/// Starts a thread running `entry(arg)` on a fresh 256 KiB stack with a
/// fresh TLS block (FS set by `CLONE_SETTLS`); returns its tid.
pub fn spawn_thread(entry: extern "C" fn(usize) -> !, arg: usize) -> Result<usize, NewOsProcError> {
    let stack = mmap_anon(M_STACK);
    if stack.is_null() {
        return Err(NewOsProcError);
    }
    // SAFETY: the template describes this image's PT_TLS segment.
    let tls = unsafe { TlsBlock::new(&crate::tls_template()) }.ok_or(NewOsProcError)?;
    let tp = tls.thread_pointer();
    // The thread uses the block until the process ends.
    core::mem::forget(tls);
    let flags = CLONE_VM
        | CLONE_FS
        | CLONE_FILES
        | CLONE_SIGHAND
        | CLONE_THREAD
        | CLONE_SYSVSEM
        | CLONE_SETTLS;
    // SAFETY: a fresh stack and TLS block for this thread alone; entry
    // never returns.
    let r = unsafe { clone_thread(flags, stack as usize + M_STACK, tp, entry, arg) };
    if r < 0 {
        Err(NewOsProcError)
    } else {
        Ok(r as usize)
    }
}

/// Where a new M's thread starts: `clone_thread` calls it with the M.
extern "C" fn m_entry(arg: usize) -> ! {
    let mp = arg as *mut M;
    // CLONE_SETTLS already set FS; set it again the chosen way, so both
    // modes are exercised on every M, then record what the M sees.
    let tp = fs0();
    // SAFETY: tp is this thread's TLS block (made in newosproc, leaked).
    unsafe { set_fs(tp) };
    record_m(tp);
    // SAFETY: the Platform contract: a fresh thread for this M, once.
    unsafe { gokernel::proc::mstart0(mp) };
    // The M is done: end this thread (not the process).
    loop {
        // SAFETY: exit(2) ends only the calling thread.
        unsafe { syscall6(SYS_EXIT, [0, 0, 0, 0, 0, 0]) };
    }
}

/// `clone(2)` a thread that runs `entry(arg)` on `stack_top` with FS base
/// `tls`; returns the child's tid or a negative errno.
///
/// Register contract:
/// - in: rdi = flags, rsi = stack top (16-byte aligned), rdx = tls,
///   rcx = entry, r8 = arg;
/// - out (parent): rax = tid or -errno; (child) runs entry(arg) with rsp
///   16-byte aligned at the call, then exits the thread if it returns;
/// - clobbered: rax, rcx, rdx, rsi, rdi, r8, r10, r11;
/// - stack: the parent's is untouched; the child starts on `stack_top`
///   with entry and arg stored just below it.
///
/// # Safety
///
/// `stack_top` must be the top of a stack nobody else uses, `tls` a TLS
/// block that outlives the thread, and `entry` must never return (it ends
/// its thread).
#[unsafe(naked)]
unsafe extern "C" fn clone_thread(
    flags: usize,
    stack_top: usize,
    tls: usize,
    entry: extern "C" fn(usize) -> !,
    arg: usize,
) -> isize {
    naked_asm!(
        "sub rsi, {two_words}",
        "mov qword ptr [rsi], rcx",          // entry, for the child
        "mov qword ptr [rsi + {word}], r8",  // arg, for the child
        "mov r8, rdx",                  // tls (5th syscall argument)
        "xor edx, edx",                 // parent_tid
        "xor r10d, r10d",               // child_tid
        "mov eax, {nr}",
        "syscall",
        "test rax, rax",
        "jnz 2f",
        // Child: rsp = stack_top - 16, 16-byte aligned.
        "xor ebp, ebp",
        "mov rax, qword ptr [rsp]",
        "mov rdi, qword ptr [rsp + {word}]",
        "call rax",
        "ud2",
        "2:",
        "ret",
        nr = const SYS_CLONE,
        word = const core::mem::size_of::<usize>(),
        two_words = const 2 * core::mem::size_of::<usize>(),
    )
}

// SAFETY: newosproc runs mstart0 once on a fresh clone(2) thread with its
// own stack and TLS block (or, in CPU mode, is never called: starts_threads
// is false) (default FP environment: a new thread inherits
// none of ours beyond the defaults, which Rust code never changes); futex
// calls are FUTEX_WAIT / FUTEX_WAKE, whose timeouts run on CLOCK_MONOTONIC,
// the clock nanotime reads.
unsafe impl Platform for Image {
    /// A clone(2) thread with a 256 KiB stack and a fresh TLS block.
    ///
    /// # Safety
    ///
    /// As [`Platform::newosproc`].
    unsafe fn newosproc(&self, mp: *mut M) -> Result<(), NewOsProcError> {
        NEWOSPROC_CALLS.fetch_add(1, Ordering::Relaxed);
        if cpu_mode() {
            return Err(NewOsProcError);
        }
        spawn_thread(m_entry, mp as usize).map(drop)
    }

    /// False in CPU mode: the Ms are the threads that join.
    fn starts_threads(&self) -> bool {
        !cpu_mode()
    }

    fn futexsleep(&self, addr: &AtomicU32, val: u32, timeout_ns: Option<u64>) {
        if gokernel::getg().is_null() && gettid() != MAIN_TID.load(Ordering::Relaxed) {
            NONM_SLEEPS.fetch_add(1, Ordering::Relaxed);
        }
        let ts =
            timeout_ns.map(|ns| [(ns / 1_000_000_000) as usize, (ns % 1_000_000_000) as usize]);
        let tsp = ts.as_ref().map_or(0, |t| t.as_ptr() as usize);
        // SAFETY: FUTEX_WAIT on a live aligned u32 (compared atomically).
        unsafe {
            syscall6(
                SYS_FUTEX,
                [
                    addr.as_ptr() as usize,
                    FUTEX_WAIT_PRIVATE,
                    val as usize,
                    tsp,
                    0,
                    0,
                ],
            )
        };
    }

    fn futexwakeup(&self, addr: &AtomicU32, cnt: u32) {
        // SAFETY: FUTEX_WAKE uses the address only as a key.
        unsafe {
            syscall6(
                SYS_FUTEX,
                [
                    addr.as_ptr() as usize,
                    FUTEX_WAKE_PRIVATE,
                    cnt as usize,
                    0,
                    0,
                    0,
                ],
            )
        };
    }

    fn ncpu(&self) -> usize {
        2
    }

    /// `clock_gettime(CLOCK_MONOTONIC)` as a raw system call.
    fn nanotime(&self) -> u64 {
        monotonic_ns()
    }
}
