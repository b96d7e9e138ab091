//! What the scheduler needs from the world it runs in.
//!
//! The core never makes a system call itself. Starting an M, sleeping an
//! idle one and waking it, reading the clock for timers, and knowing how
//! many CPUs there are go through [`Platform`]. The hosted platform (`hosted`, with the `std` feature)
//! uses OS threads and Linux futexes; a kernel implements the trait over
//! its own CPUs and wait queues.
//!
//! A kernel that hands its CPUs to the scheduler instead of letting it
//! start threads says so with [`Platform::starts_threads`] and makes each
//! CPU an M with [`crate::cpu::join`]; see `docs/interrupts.md`.

use core::sync::atomic::AtomicU32;

use crate::runtime2::M;

/// Why an M could not be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewOsProcError;

impl core::fmt::Display for NewOsProcError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("the platform could not start a thread for a new M")
    }
}

/// The services the scheduler needs.
///
/// # Safety
///
/// Implementations must keep these promises, which the scheduler's
/// correctness (no lost wake-ups, no use of freed Ms) rests on:
///
/// - [`newosproc`](Platform::newosproc) runs `crate::proc::mstart0(mp)` on
///   a new thread of execution with its own stack (at least 64 KiB), its
///   own TLS block for the slot in [`tls`](crate::tls), and the default
///   floating-point environment; it calls it exactly once.
/// - [`futexsleep`](Platform::futexsleep) returns at once if `*addr != val`
///   when it looks, atomically with going to sleep (no wake-up between the
///   check and the sleep may be lost); it may also return spuriously.
/// - [`futexwakeup`](Platform::futexwakeup) wakes at least one sleeper on
///   `addr` if there is one, up to `cnt`.
/// - [`futexsleep`](Platform::futexsleep) with a timeout of `ns` returns
///   after at most about `ns` nanoseconds of [`nanotime`](Platform::nanotime)
///   even if nobody wakes it (an idle M sleeping until the next timer
///   relies on it); it may return earlier.
/// - [`nanotime`](Platform::nanotime) is monotonic: it never goes back,
///   and every M reads the same clock, so a reading on one M is never later
///   than a reading taken afterwards on another.
/// - Where the hooks are called from. [`futexwakeup`](Platform::futexwakeup)
///   is called with the scheduler's spin locks held (`Sched::lock`, an M's
///   inbox, a channel's lock) and, by [`crate::intr`], from an interrupt
///   handler (a signal handler, hosted) whatever code it interrupted: it
///   must take no lock that code may hold, allocate nothing, and not
///   sleep. [`futexsleep`](Platform::futexsleep) is called with no
///   gokernel lock held, on an M's system stack (g0) or on a plain thread
///   that blocks on a gokernel object; [`nanotime`](Platform::nanotime)
///   under the scheduler lock and a P's timer lock;
///   [`newosproc`](Platform::newosproc) with no lock held. None is called
///   from an interrupt handler but `futexwakeup`, and `nanotime` by
///   [`on_timer_interrupt`](crate::preempt::on_timer_interrupt) when a
///   kernel enabled preemption.
/// - When [`starts_threads`](Platform::starts_threads) is false, the Ms are
///   the CPUs that call [`crate::cpu::join`], and `futexsleep` is how an
///   idle CPU waits: on a kernel, `hlt` (or `mwait`) with interrupts
///   enabled until `*addr != val` or the timeout, and `futexwakeup` an IPI
///   to the CPUs that sleep on `addr` (or to every sleeping CPU: a CPU
///   that finds `*addr` unchanged sleeps again, so waking too many is only
///   slower). The check of `*addr` and the halt must not lose a wake-up
///   that arrives in between (on x86, `sti; hlt` with the check before
///   the `sti`).
///
/// And, built without `std`, the embedder accepts goroutine stacks without
/// a hardware guard: they come from the global allocator with only a soft
/// guard below each (see [`stack`](crate::stack)), checked when a goroutine
/// switches out, so the embedder promises that no goroutine overflows its
/// stack, or unmaps the page below each stack's `lo` in its own page tables
/// (a kernel with paging can) so that an overflow faults. The hosted
/// platform gives every stack a `PROT_NONE` guard page instead.
pub unsafe trait Platform: Sync + 'static {
    /// Starts a thread that runs `crate::proc::mstart0(mp)`.
    ///
    /// # Safety
    ///
    /// `mp` must be a live M made by the scheduler for this thread, not
    /// running anywhere; it stays live until `mstart0` returns.
    ///
    /// # Errors
    ///
    /// [`NewOsProcError`] if no thread could be started.
    unsafe fn newosproc(&self, mp: *mut M) -> Result<(), NewOsProcError>;
    /// Whether the scheduler may start Ms with [`newosproc`](Self::newosproc)
    /// (true by default). A platform that returns false is never asked to
    /// start one: its Ms are the CPUs (or threads) that call
    /// [`crate::cpu::join`], and the scheduler never needs more Ms than
    /// joined. Work that finds no idle M is left where every M looks (the
    /// run queues) and an idle joined M is woken with
    /// [`futexwakeup`](Self::futexwakeup) on what it sleeps on; see
    /// [`crate::cpu`]. Its answer must not change while a scheduler uses
    /// the platform.
    ///
    /// ```
    /// use core::sync::atomic::AtomicU32;
    /// use gokernel::platform::{NewOsProcError, Platform};
    /// use gokernel::runtime2::M;
    ///
    /// /// A kernel's platform: its CPUs join; no threads.
    /// struct Cpus;
    /// // SAFETY: (a sketch) futexsleep would halt until *addr != val,
    /// // futexwakeup send an IPI; newosproc is never called.
    /// unsafe impl Platform for Cpus {
    ///     /// # Safety
    ///     ///
    ///     /// Never called: `starts_threads` is false.
    ///     unsafe fn newosproc(&self, _: *mut M) -> Result<(), NewOsProcError> {
    ///         Err(NewOsProcError)
    ///     }
    ///     fn starts_threads(&self) -> bool {
    ///         false
    ///     }
    ///     fn futexsleep(&self, addr: &AtomicU32, val: u32, _: Option<u64>) {
    ///         while addr.load(core::sync::atomic::Ordering::SeqCst) == val {
    ///             core::hint::spin_loop(); // a kernel: sti; hlt
    ///         }
    ///     }
    ///     fn futexwakeup(&self, _: &AtomicU32, _: u32) {} // a kernel: an IPI
    ///     fn ncpu(&self) -> usize {
    ///         2
    ///     }
    ///     fn nanotime(&self) -> u64 {
    ///         0 // a kernel: its clock
    ///     }
    /// }
    /// assert!(!Cpus.starts_threads());
    /// ```
    fn starts_threads(&self) -> bool {
        true
    }
    /// Sleeps while `*addr == val`, at most `timeout_ns` if given.
    fn futexsleep(&self, addr: &AtomicU32, val: u32, timeout_ns: Option<u64>);
    /// Wakes up to `cnt` threads sleeping on `addr`.
    fn futexwakeup(&self, addr: &AtomicU32, cnt: u32);
    /// How many CPUs the scheduler may use (the default for `procs`).
    fn ncpu(&self) -> usize;
    /// Monotonic time in nanoseconds since an arbitrary origin fixed for
    /// the life of the process (Go's `nanotime`): timer deadlines are
    /// readings of this clock. Only the differences between readings mean
    /// anything.
    ///
    /// ```
    /// # #[cfg(feature = "std")] {
    /// use gokernel::platform::{Platform, hosted::HOSTED};
    ///
    /// let a = HOSTED.nanotime();
    /// let b = HOSTED.nanotime();
    /// assert!(b >= a);
    /// # }
    /// ```
    fn nanotime(&self) -> u64;
}

/// The hosted platform: Linux threads and futexes.
#[cfg(feature = "std")]
pub mod hosted {
    use core::sync::atomic::AtomicU32;

    use super::{NewOsProcError, Platform};
    use crate::runtime2::M;

    /// The hosted platform (stateless).
    pub struct Hosted;

    /// The one instance schedulers refer to.
    pub static HOSTED: Hosted = Hosted;

    /// Stack size of an M's thread, which is its g0 stack.
    const G0_STACK: usize = 1 << 20;

    /// A pointer to an M, sent to the M's new thread.
    struct SendM(*mut M);
    // SAFETY: the M is handed over to the new thread, which is from then on
    // the only one running it.
    unsafe impl Send for SendM {}

    // SAFETY: newosproc starts a std thread (own stack, own TLS block,
    // default FP environment) that calls mstart0 once; the futex calls are
    // Linux's FUTEX_WAIT / FUTEX_WAKE, which check the value atomically
    // and time out against CLOCK_MONOTONIC, the clock nanotime reads.
    unsafe impl Platform for Hosted {
        /// A std thread named `gokernel-m<id>` with a 1 MiB stack (g0's).
        ///
        /// # Safety
        ///
        /// As [`Platform::newosproc`].
        unsafe fn newosproc(&self, mp: *mut M) -> Result<(), NewOsProcError> {
            let m = SendM(mp);
            // SAFETY: mp is live; only its id is read.
            let id = unsafe { (*mp).id };
            std::thread::Builder::new()
                .name(std::format!("gokernel-m{id}"))
                .stack_size(G0_STACK)
                .spawn(move || {
                    let m = m;
                    // SAFETY: the contract of newosproc: a fresh thread
                    // runs mstart0 once for this M.
                    unsafe { crate::proc::mstart0(m.0) }
                })
                .map(drop)
                .map_err(|_| NewOsProcError)
        }

        fn futexsleep(&self, addr: &AtomicU32, val: u32, timeout_ns: Option<u64>) {
            let ts = timeout_ns.map(|ns| libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            });
            let tsp = ts
                .as_ref()
                .map_or(core::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: FUTEX_WAIT on a live, aligned u32; the kernel compares
            // *addr with val atomically with going to sleep. Errors (EAGAIN,
            // EINTR, ETIMEDOUT) all mean "return", which callers handle.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    addr.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    val,
                    tsp,
                );
            }
        }

        fn futexwakeup(&self, addr: &AtomicU32, cnt: u32) {
            // SAFETY: FUTEX_WAKE only uses the address as a key.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    addr.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    cnt,
                );
            }
        }

        fn ncpu(&self) -> usize {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }

        /// `clock_gettime(CLOCK_MONOTONIC)` (a vDSO call, no system call).
        fn nanotime(&self) -> u64 {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes one timespec into `ts`, which is
            // live; CLOCK_MONOTONIC always exists on Linux.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        }
    }
}
