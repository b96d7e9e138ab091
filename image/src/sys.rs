//! Raw Linux system calls: the image's whole interface to its "hardware".

use core::arch::asm;

pub const SYS_READ: usize = 0;
pub const SYS_WRITE: usize = 1;
pub const SYS_CLOSE: usize = 3;
pub const SYS_RT_SIGACTION: usize = 13;
pub const SYS_RT_SIGRETURN: usize = 15;
pub const SYS_GETPID: usize = 39;
pub const SYS_GETTID: usize = 186;
pub const SYS_SIGALTSTACK: usize = 131;
pub const SYS_TGKILL: usize = 234;
pub const SYS_OPENAT: usize = 257;
pub const SYS_MMAP: usize = 9;
pub const SYS_MUNMAP: usize = 11;
pub const SYS_CLONE: usize = 56;
pub const SYS_EXIT: usize = 60;
pub const SYS_ARCH_PRCTL: usize = 158;
pub const SYS_FUTEX: usize = 202;
pub const SYS_CLOCK_GETTIME: usize = 228;
pub const SYS_EXIT_GROUP: usize = 231;

pub const ARCH_SET_FS: usize = 0x1002;
pub const ARCH_GET_FS: usize = 0x1003;

pub const CLOCK_MONOTONIC: usize = 1;

pub const EINTR: isize = 4;
pub const AT_FDCWD: usize = -100isize as usize;

pub const SIGUSR1: usize = 10;
pub const SIGUSR2: usize = 12;
pub const SIGURG: usize = 23;
pub const SA_ONSTACK: u64 = 0x0800_0000;
pub const SA_RESTORER: u64 = 0x0400_0000;

pub const FUTEX_WAIT_PRIVATE: usize = 128;
pub const FUTEX_WAKE_PRIVATE: usize = 129;

pub const PROT_READ: usize = 1;
pub const PROT_WRITE: usize = 2;
pub const MAP_PRIVATE: usize = 0x02;
pub const MAP_ANONYMOUS: usize = 0x20;
pub const MAP_NORESERVE: usize = 0x4000;

pub const CLONE_VM: usize = 0x100;
pub const CLONE_FS: usize = 0x200;
pub const CLONE_FILES: usize = 0x400;
pub const CLONE_SIGHAND: usize = 0x800;
pub const CLONE_THREAD: usize = 0x10000;
pub const CLONE_SYSVSEM: usize = 0x40000;
pub const CLONE_SETTLS: usize = 0x80000;

/// A system call with up to six arguments; returns the raw result
/// (negative errno on failure).
///
/// # Safety
///
/// The call and its arguments must be valid for the kernel and must not
/// break any Rust invariant (memory the call writes must be ours).
pub unsafe fn syscall6(n: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the contract; syscall clobbers rcx and r11 only.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Writes all of `buf` to `fd`.
pub fn write_all(fd: usize, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: write(2) reads `buf`, which is live.
        let n = unsafe { syscall6(SYS_WRITE, [fd, buf.as_ptr() as usize, buf.len(), 0, 0, 0]) };
        if n == -EINTR {
            continue;
        }
        if n <= 0 {
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// Ends the process.
pub fn exit_group(code: i32) -> ! {
    loop {
        // SAFETY: exit_group(2) does not return.
        unsafe { syscall6(SYS_EXIT_GROUP, [code as usize, 0, 0, 0, 0, 0]) };
    }
}

/// Maps `len` bytes of fresh zeroed memory, or null.
pub fn mmap_anon(len: usize) -> *mut u8 {
    // SAFETY: an anonymous private mapping at a kernel-chosen address.
    let r = unsafe {
        syscall6(
            SYS_MMAP,
            [
                0,
                len,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                usize::MAX,
                0,
            ],
        )
    };
    if r < 0 {
        core::ptr::null_mut()
    } else {
        r as *mut u8
    }
}

/// Unmaps what [`mmap_anon`] mapped.
///
/// # Safety
///
/// `p`/`len` must be a mapping from `mmap_anon` that nothing uses.
pub unsafe fn munmap(p: *mut u8, len: usize) {
    // SAFETY: the contract.
    unsafe { syscall6(SYS_MUNMAP, [p as usize, len, 0, 0, 0, 0]) };
}

/// Sets this thread's FS base with `arch_prctl(ARCH_SET_FS)`: the
/// fallback when `wrfsbase` is not allowed.
///
/// # Safety
///
/// `tp` must be the thread pointer of a TLS block that outlives the thread.
pub unsafe fn arch_set_fs(tp: usize) -> isize {
    // SAFETY: the contract.
    unsafe { syscall6(SYS_ARCH_PRCTL, [ARCH_SET_FS, tp, 0, 0, 0, 0]) }
}

/// This thread's FS base from `arch_prctl(ARCH_GET_FS)`.
pub fn arch_get_fs() -> usize {
    let mut v = 0usize;
    // SAFETY: the kernel writes one word into `v`.
    unsafe {
        syscall6(
            SYS_ARCH_PRCTL,
            [ARCH_GET_FS, &raw mut v as usize, 0, 0, 0, 0],
        )
    };
    v
}

/// `clock_gettime(CLOCK_MONOTONIC)` by a real system call (the image has
/// no vDSO parser), in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = [0u64; 2]; // struct timespec: tv_sec, tv_nsec
    // SAFETY: the kernel writes one timespec (two words) into `ts`.
    unsafe {
        syscall6(
            SYS_CLOCK_GETTIME,
            [CLOCK_MONOTONIC, ts.as_mut_ptr() as usize, 0, 0, 0, 0],
        )
    };
    ts[0] * 1_000_000_000 + ts[1]
}

/// The kernel's `struct sigaction` for `rt_sigaction(2)` on x86_64.
#[repr(C)]
struct KSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Returns from a signal handler: `rt_sigreturn(2)` on the frame the
/// kernel pushed.
///
/// Register contract:
/// - in: rsp = the signal frame (the handler's `ret` popped this
///   restorer's address);
/// - out: never returns: the kernel restores the interrupted context;
/// - clobbered: rax (the context is restored anyway);
/// - stack: the kernel's signal frame, untouched.
///
/// # Safety
///
/// Only the kernel enters it, as `sa_restorer`.
#[unsafe(naked)]
unsafe extern "C" fn sigreturn() -> ! {
    core::arch::naked_asm!("mov eax, {nr}", "syscall", "ud2", nr = const SYS_RT_SIGRETURN)
}

/// Installs `handler` for `sig`, run on the thread's alternate signal
/// stack (SA_ONSTACK), without SA_RESTART: a system call it interrupts
/// (a futex wait) returns EINTR, which callers must take as spurious.
///
/// # Safety
///
/// `handler` must be safe to run at any point of any thread that does not
/// block `sig`.
pub unsafe fn sigaction(sig: usize, handler: extern "C" fn(i32)) -> isize {
    let act = KSigaction {
        handler: handler as usize,
        flags: SA_ONSTACK | SA_RESTORER,
        restorer: sigreturn as *const () as usize,
        mask: 0,
    };
    // SAFETY: the contract; the kernel reads one sigaction and the 8-byte
    // mask size.
    unsafe { syscall6(SYS_RT_SIGACTION, [sig, &raw const act as usize, 0, 8, 0, 0]) }
}

/// Gives the calling thread an alternate signal stack of `len` bytes.
pub fn sigaltstack(len: usize) -> isize {
    let sp = mmap_anon(len);
    if sp.is_null() {
        return -12;
    }
    // stack_t: ss_sp, ss_flags (int, padded), ss_size.
    let ss: [usize; 3] = [sp as usize, 0, len];
    // SAFETY: the kernel reads one stack_t; the mapping is ours for good.
    unsafe { syscall6(SYS_SIGALTSTACK, [ss.as_ptr() as usize, 0, 0, 0, 0, 0]) }
}

/// Sends `sig` to thread `tid` of this process.
pub fn tgkill(tid: usize, sig: usize) -> isize {
    // SAFETY: getpid and tgkill touch no memory of ours.
    unsafe {
        let pid = syscall6(SYS_GETPID, [0; 6]) as usize;
        syscall6(SYS_TGKILL, [pid, tid, sig, 0, 0, 0])
    }
}

/// What `/proc/self/task/<tid>/stat` says of a thread: its state letter
/// and its user + system CPU time in clock ticks.
pub fn thread_stat(tid: usize) -> Option<(u8, u64)> {
    let mut path: heapless::String<64> = heapless::String::new();
    core::fmt::Write::write_fmt(&mut path, format_args!("/proc/self/task/{tid}/stat\0")).ok()?;
    // SAFETY: a NUL-terminated path; O_RDONLY.
    let fd = unsafe { syscall6(SYS_OPENAT, [AT_FDCWD, path.as_ptr() as usize, 0, 0, 0, 0]) };
    if fd < 0 {
        return None;
    }
    let mut buf = [0u8; 512];
    // SAFETY: read(2) writes at most buf.len() bytes into buf.
    let n = unsafe {
        syscall6(
            SYS_READ,
            [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0],
        )
    };
    // SAFETY: closes the descriptor we opened.
    unsafe { syscall6(SYS_CLOSE, [fd as usize, 0, 0, 0, 0, 0]) };
    if n <= 0 {
        return None;
    }
    let text = core::str::from_utf8(&buf[..n as usize]).ok()?;
    // Fields after the command name, which ends at the last ')': state is
    // field 3, utime 14 and stime 15.
    let rest = &text[text.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.bytes().next()?;
    let mut f = f.skip(10);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((state, utime + stime))
}

/// The calling thread's id.
pub fn gettid() -> usize {
    // SAFETY: gettid touches no memory.
    unsafe { syscall6(SYS_GETTID, [0; 6]) as usize }
}
