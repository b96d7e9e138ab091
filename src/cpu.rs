//! CPUs that join a scheduler as its Ms.
//!
//! Hosted, an M is a thread the scheduler starts when it needs one
//! ([`Platform::newosproc`]). A kernel has a fixed set of CPUs and no
//! threads to give: each CPU calls [`join`] with its TLS block in FS and
//! becomes an M of the scheduler until it shuts down, and the platform
//! says it starts no threads ([`Platform::starts_threads`] false). The
//! scheduler then never makes an M of its own:
//!
//! - **Ms are the CPUs that joined.** `startm` (Go's: wake an idle M with
//!   a P, or make one) wakes an idle joined M if there is one. If there is
//!   none, every joined M is running, on its way to sleep, or the timer
//!   sleeper: the P goes back to the idle list (the Gs on its ring to the
//!   global queue, which busy Ms look at every 61st schedule, where they
//!   would not steal), `wantm` is set, and the
//!   timer sleeper is woken (`netpollbreak`). An M on its way to sleep
//!   finds `wantm` (read under the scheduler lock in `stopm`, which
//!   `startm` set it under; in `timersleep` after its store of `sleeping`)
//!   and takes the idle P as a spinning M instead of sleeping; a running
//!   M finds the work at its next scheduling point.
//! - **Idle CPUs sleep in the platform.** An idle M sleeps on its note
//!   ([`Platform::futexsleep`]: `hlt` on a kernel) and is woken by
//!   [`Platform::futexwakeup`] (an IPI). The timer sleeper sleeps the same
//!   way with a timeout (the kernel's timer interrupt ends it).
//! - **Interrupts** wake goroutines through [`crate::intr`], which kicks
//!   an idle M without taking any lock.
//! - **Locked goroutines** ([`lock_os_thread`](crate::proc::lock_os_thread)):
//!   the goroutine's CPU runs only it, as its thread would hosted; while
//!   it is parked that CPU sleeps, and its P goes to another CPU. So a
//!   kernel with N CPUs that locks k goroutines has N − k CPUs for the
//!   rest. Starting a goroutine locked on a CPU of its own ([`try_go_locked`],
//!   [`Sched::go_locked`]) needs an idle joined CPU that no started
//!   goroutine lives on; with none it is an error ([`GoLockedError::NoFreeCpu`]),
//!   not a wait for a CPU that may never come.
//! - **Shutdown**: [`Sched::shutdown`] from a CPU or thread that is not an
//!   M of the scheduler waits until every joined CPU has left; [`shutdown`]
//!   (this module) only starts it, and may be called from a goroutine.
//!   Each CPU's [`join`] returns once the scheduler has stopped and that
//!   CPU has unwound (or, without unwinding, abandoned) its goroutines.
//!
//! Joining also works on a platform that starts threads: the joined M is
//! one more M, and the scheduler still starts threads when it needs them.
//!
//! With CPUs joined, `procs` should be at most the number of CPUs that
//! join: a P no M can hold stays idle, and every wake-up that finds it
//! idle takes the scheduler lock to learn there is no M for it.
//!
//! See `docs/interrupts.md`.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering, fence};

use crate::bound::{IDLE, TIMER};
use crate::lock_futex::{notekick, notekicked, notesleep};
use crate::platform::Platform;
use crate::runtime2::{M, P, Sched, SchedLocked, status};
use crate::stack::StackError;

/// The scheduler's record of its Ms for lock-free wake-ups, and the
/// CPU-mode state.
pub(crate) struct Cpus {
    /// `startm` found no idle M and starts no threads: the next M to go
    /// idle takes an idle P as a spinning M instead of sleeping. Set under
    /// the scheduler lock, SeqCst (read by `timersleep` without it).
    wantm: AtomicBool,
    /// Every M of the scheduler, newest first, for [`kick`]: a lock-free
    /// list that only grows (an interrupt handler walks it).
    mlist: AtomicPtr<MNode>,
    /// CPUs that have called [`join`] (and not returned).
    njoined: AtomicU32,
}

/// An entry of [`Cpus::mlist`]; immutable once pushed.
struct MNode {
    m: *mut M,
    next: *mut MNode,
}

impl Cpus {
    pub(crate) const fn new() -> Self {
        Cpus {
            wantm: AtomicBool::new(false),
            mlist: AtomicPtr::new(null_mut()),
            njoined: AtomicU32::new(0),
        }
    }
}

impl Drop for Cpus {
    fn drop(&mut self) {
        let mut n = *self.mlist.get_mut();
        while !n.is_null() {
            // SAFETY: every node was made by Box::into_raw in mregister;
            // the scheduler is being dropped, so nobody walks the list.
            let b = unsafe { Box::from_raw(n) };
            n = b.next;
        }
    }
}

/// Records a new M of `sched` where [`kick`] finds it. Before the M first
/// sleeps.
pub(crate) fn mregister(sched: &Sched, mp: *mut M) {
    let node = Box::into_raw(Box::new(MNode {
        m: mp,
        next: null_mut(),
    }));
    let list = &sched.cpus.mlist;
    let mut head = list.load(Ordering::Relaxed);
    loop {
        // SAFETY: the node is ours until the push publishes it.
        unsafe { (*node).next = head };
        // Release: the node's fields before a walker that sees it.
        match list.compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return,
            Err(h) => head = h,
        }
    }
}

/// The platform plain threads sleep through when they block on a
/// gokernel object without `std`: the first scheduler's.
#[cfg(not(feature = "std"))]
static THREAD_PLATFORM: spin::Once<&'static dyn Platform> = spin::Once::new();

/// A scheduler was made with `p`: plain threads may sleep through it.
pub(crate) fn note_platform(p: &'static dyn Platform) {
    #[cfg(not(feature = "std"))]
    THREAD_PLATFORM.call_once(|| p);
    #[cfg(feature = "std")]
    let _ = p;
}

/// The platform a plain thread sleeps through (see `sema`), if a
/// scheduler has been made; without `std` only.
#[cfg(not(feature = "std"))]
pub(crate) fn thread_platform() -> Option<&'static dyn Platform> {
    THREAD_PLATFORM.get().copied()
}

/// Turns the calling CPU into an M of `sched` and runs goroutines on it
/// until the scheduler shuts down ([`Sched::shutdown`] or [`shutdown`]);
/// then returns, and the CPU is no longer an M.
///
/// The CPU (or thread) takes an idle P if there is one and looks for work
/// as a spinning M would; with none, or nothing to do, it sleeps in
/// [`Platform::futexsleep`] until the scheduler wakes it
/// ([`Platform::futexwakeup`]) with a P. Goroutines that start on it stay
/// on it (the default binding; see [`crate::bound`]).
///
/// # Safety
///
/// - FS points at this CPU's own TLS block (see [`crate::tls`]), which
///   outlives the call, and the CPU runs nothing else of gokernel's: it
///   is not an M already (that is a fatal error), and no interrupt
///   handler on it calls anything but [`crate::intr`]'s interrupt-safe
///   calls.
/// - The stack the CPU calls from is its g0 stack: at least 64 KiB (the
///   scheduler, timer callbacks and [`crate::intr::IrqWork`] functions
///   run on it), and it stays the CPU's until `join` returns.
/// - Interrupts may be on or off; [`Platform::futexsleep`] is where the
///   CPU waits, so a kernel enables them there if it needs them to wake.
/// - The floating-point environment is the default one, as for
///   [`Platform::newosproc`]'s threads.
///
/// # Example
///
/// A plain thread stands in for a CPU here (hosted: std threads have a
/// TLS block in FS already):
///
/// ```
/// use gokernel::platform::hosted::HOSTED;
/// use gokernel::runtime2::Sched;
///
/// let sched = Sched::leak(Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED));
/// let cpu = std::thread::spawn(move || {
///     // SAFETY: a std thread has its own TLS block and runs nothing else.
///     unsafe { gokernel::cpu::join(sched) }
/// });
/// let c = gokernel::chan::<u32>(1);
/// let tx = c.clone();
/// sched.go(Box::new(move || tx.send(42).unwrap())).unwrap();
/// assert_eq!(c.recv().unwrap(), 42);
/// sched.shutdown(); // the joined thread's `join` returns
/// cpu.join().unwrap();
/// ```
pub unsafe fn join(sched: &'static Sched) {
    let mut m = M::new(sched.mnext.fetch_add(1, Ordering::Relaxed));
    m.rt = sched;
    m.bindg = !sched.migrate;
    let mp = Box::into_raw(m);
    sched.allm.lock().push(mp);
    // Counted before it runs, as newm counts a thread: shutdown and the
    // teardown barrier wait for it.
    sched.nmlive.fetch_add(1, Ordering::SeqCst);
    mregister(sched, mp);
    sched.cpus.njoined.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the contract: this CPU is not an M and its FS is set; mp is
    // new and lives in allm as long as the scheduler ('static).
    unsafe {
        crate::proc::mstart(mp, || {
            // Take an idle P as a spinning M, or sleep until given one.
            let got = crate::proc::spin_on_idle_p(&mut sched.lock.lock(), sched, mp)
                || crate::proc::stopm(sched, mp);
            if !got {
                crate::teardown::mexit(sched, mp)
            }
            crate::proc::schedule()
        });
    }
    sched.cpus.njoined.fetch_sub(1, Ordering::Relaxed);
    // Release: everything this M did happens before shutdown sees it gone.
    sched.nmlive.fetch_sub(1, Ordering::Release);
    sched.platform.futexwakeup(&sched.nmlive, 1);
}

/// Starts shutting `sched` down without waiting: what
/// [`Sched::shutdown`] does before it waits for the Ms to leave. A
/// goroutine may call it (`Sched::shutdown` from a goroutine of its own
/// scheduler would wait for its own M); each joined CPU's [`join`]
/// returns once every M has stopped. Calling it twice is harmless.
///
/// ```
/// use gokernel::platform::hosted::HOSTED;
/// use gokernel::runtime2::Sched;
///
/// let sched = Sched::leak(Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED));
/// let cpu = std::thread::spawn(move || {
///     // SAFETY: a std thread has its own TLS block and runs nothing else.
///     unsafe { gokernel::cpu::join(sched) }
/// });
/// sched.go(Box::new(move || gokernel::cpu::shutdown(sched))).unwrap();
/// cpu.join().unwrap(); // returns once the goroutine has finished
/// ```
pub fn shutdown(sched: &Sched) {
    sched.stop();
}

/// Why [`try_go_locked`] did not start the goroutine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoLockedError {
    /// Its stack could not be allocated.
    Stack(StackError),
    /// The platform starts no threads and no joined CPU is idle with no
    /// started goroutine living on it.
    NoFreeCpu,
}

impl core::fmt::Display for GoLockedError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GoLockedError::Stack(e) => write!(f, "{e}"),
            GoLockedError::NoFreeCpu => f.write_str(
                "no joined CPU is free for a locked goroutine (each is busy or has goroutines of its own), and the platform starts no threads",
            ),
        }
    }
}

/// [`Sched::go_locked`] that reports, instead of panicking, when the
/// platform starts no threads and no joined CPU is free: an idle one
/// that no started, unfinished goroutine lives on. The goroutine then has
/// that CPU to itself until it unlocks or returns.
///
/// On a platform that starts threads this is `Sched::go_locked` (a new M
/// when no idle one is free), with its stack error.
///
/// # Errors
///
/// - [`GoLockedError::Stack`] if the goroutine's stack cannot be
///   allocated (`f` is dropped);
/// - [`GoLockedError::NoFreeCpu`] if the platform starts no threads and
///   no joined CPU is free (`f` is dropped, the goroutine never runs).
///
/// ```
/// use gokernel::cpu::{GoLockedError, try_go_locked};
/// use gokernel::platform::hosted::HOSTED;
/// use gokernel::runtime2::Sched;
///
/// let sched = Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED);
/// // Hosted, a thread is started for it.
/// assert!(try_go_locked(&sched, Box::new(|| {})).is_ok());
/// # let _ = GoLockedError::NoFreeCpu;
/// sched.shutdown();
/// ```
#[track_caller]
pub fn try_go_locked(
    sched: &Sched,
    f: Box<dyn FnOnce() + Send + 'static>,
) -> Result<u64, GoLockedError> {
    if sched.platform.starts_threads() {
        return crate::bound::newproc_locked(Some(sched), f).map_err(GoLockedError::Stack);
    }
    let (id, untaken) = crate::bound::newproc_golocked(sched, f).map_err(GoLockedError::Stack)?;
    let Some((gp, _spawning)) = untaken else {
        return Ok(id);
    };
    // SAFETY: gp is new, runnable, on no queue, and nobody took it.
    unsafe { discard_new_g(sched, gp) };
    Err(GoLockedError::NoFreeCpu)
}

/// A new G that will never run (no CPU for it): its closure is dropped
/// here, outside any lock (it may do anything), and the G goes back to
/// the global free list as if it had run.
///
/// # Safety
///
/// `gp` is a new runnable G of `sched` (from `newproc1`) on no queue.
pub(crate) unsafe fn discard_new_g(sched: &Sched, gp: *mut crate::runtime2::G) {
    // SAFETY: the contract: ours alone.
    unsafe {
        (*gp).startfn.clear();
        (*gp).casstatus(status::RUNNABLE, status::DEAD);
    }
    // Release: as goexit0's decrement.
    sched.ngoroutines.fetch_sub(1, Ordering::Release);
    crate::bound::gqueue_push(&mut sched.lock.lock().gfree, gp);
}

impl Sched {
    /// Makes `sched` live for the rest of the program, as [`join`] and
    /// [`crate::intr`] need: a `'static` reference to it (the `Arc` is
    /// never dropped, so neither is the scheduler, its Ms or its Gs).
    ///
    /// ```
    /// use gokernel::platform::hosted::HOSTED;
    /// use gokernel::runtime2::Sched;
    ///
    /// let sched: &'static Sched = Sched::leak(Sched::new(2, gokernel::stack::STACK_MIN, &HOSTED));
    /// assert_eq!(sched.procs(), 2);
    /// ```
    pub fn leak(sched: Arc<Sched>) -> &'static Sched {
        // SAFETY: into_raw keeps the strong count it took over, so the
        // allocation is never freed.
        unsafe { &*Arc::into_raw(sched) }
    }

    /// CPUs (or threads) that have joined through [`join`] and not left.
    ///
    /// ```
    /// use gokernel::platform::hosted::HOSTED;
    /// use gokernel::runtime2::Sched;
    ///
    /// let sched = Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED);
    /// assert_eq!(sched.joined_cpus(), 0);
    /// ```
    pub fn joined_cpus(&self) -> usize {
        self.cpus.njoined.load(Ordering::Relaxed) as usize
    }
}

// ---------------------------------------------------------------------
// The scheduler's side: startm with no M, idle Ms that look, kicks.

/// `startm` found no idle M for `pp` and the platform starts no threads:
/// gives `pp` back to the idle list and leaves the work to the Ms there
/// are (module docs). Consumes the lock guard; gives back the spinning
/// count the caller took.
pub(crate) fn startm_nom(
    mut sl: spin::MutexGuard<'_, SchedLocked>,
    sched: &Sched,
    pp: *mut P,
    spinning: bool,
) {
    // Gs on its ring would wait there until some M runs out of work of
    // its own (busy Ms do not steal): the global queue, which every M
    // looks at (every 61st schedule at least), takes them instead.
    // SAFETY: no M holds pp (the caller took it off the idle list, or
    // handoffp released it), so we are its owner until pidleput.
    let ring = unsafe { &(*pp).runq };
    if !crate::runq::runqempty(ring) {
        while let Some((gp, _)) = crate::runq::runqget(ring) {
            crate::bound::gqueue_push(&mut sl.runq, gp);
        }
        sched.runqsize.store(sl.runq.size as u32, Ordering::SeqCst);
    }
    crate::proc::pidleput(&mut sl, sched, pp);
    // SeqCst, under the lock: stopm reads it under the lock; timersleep
    // reads it after storing `sleeping`, and kick reads `sleeping` next.
    sched.cpus.wantm.store(true, Ordering::SeqCst);
    drop(sl);
    if spinning {
        sched.nmspinning.fetch_sub(1, Ordering::SeqCst);
    }
    kick(sched);
}

/// In `stopm`, under the lock, after storing `sleeping = IDLE`: work is
/// waiting for an M (`wantm`, or the injection list): takes an idle P as
/// a spinning M instead of sleeping. True if it did.
///
/// # Safety
///
/// On `mp`'s thread, in `stopm`, holding no P.
pub(crate) unsafe fn stopm_work(sl: &mut SchedLocked, sched: &Sched, mp: *mut M) -> bool {
    // SeqCst loads: the M's half of the arguments in the module docs and
    // in intr.rs.
    let want = sched.cpus.wantm.load(Ordering::SeqCst);
    if !want && !crate::intr::pending(sched) {
        return false;
    }
    if !crate::proc::spin_on_idle_p(sl, sched, mp) {
        // Every P is held: their Ms find the work.
        return false;
    }
    // SAFETY: mp is ours.
    unsafe { (*mp).sleeping.store(crate::bound::AWAKE, Ordering::Relaxed) };
    true
}

/// An M became spinning with an idle P: it will look everywhere, which
/// is what `wantm` asked for. A swap (SeqCst), so that the work published
/// before the `wantm` it clears is seen by its scan.
pub(crate) fn wantm_taken(sched: &Sched) {
    if sched.cpus.wantm.load(Ordering::Relaxed) {
        sched.cpus.wantm.swap(false, Ordering::SeqCst);
    }
}

/// For the timer sleeper, after its store of `sleeping = TIMER` and its
/// read of the timer word: work is waiting for an M.
pub(crate) fn idle_work(sched: &Sched) -> bool {
    sched.cpus.wantm.load(Ordering::SeqCst) || crate::intr::pending(sched)
}

/// After `stopm`'s `notesleep` returned: true if it was only a kick, and
/// the M, taken off the idle list, must look for work again (`stopm`
/// loops). False for a real wake-up (the note is woken: `nextp` says
/// what to do). An M kicked while it is not on the idle list (on
/// `mwantp`, or taken off by a waker who will wake it) sleeps on until
/// that wake-up.
///
/// # Safety
///
/// On `mp`'s thread, in `stopm` after its sleep.
pub(crate) unsafe fn stopm_kicked(sched: &Sched, mp: *mut M) -> bool {
    // SAFETY: the contract: the note and onmidle (under the lock) are ours
    // to read.
    unsafe {
        loop {
            if !notekicked(&(*mp).park) {
                return false;
            }
            {
                let mut sl = sched.lock.lock();
                if (*mp).onmidle {
                    crate::bound::mremove(&mut sl, mp);
                    return true;
                }
            }
            notesleep(sched.platform, &(*mp).park);
        }
    }
}

/// `notesleep` that ignores kicks: for an M that sleeps for one thing
/// only (its locked G, in `stoplockedm`). A kick can reach it only if it
/// was idle a moment before; it holds or held a P since, and drains the
/// injection list or idles the P with a look at it, so the kick is not
/// needed.
pub(crate) fn notesleep_woken(p: &dyn Platform, n: &crate::lock_futex::Note) {
    loop {
        notesleep(p, n);
        if !notekicked(n) {
            return;
        }
    }
}

/// Work is waiting for an M (a post to the injection list, or `wantm`):
/// wakes an idle M to look, unless no P is idle (their Ms look at their
/// next scheduling point) or an M spins (it looks before it sleeps).
/// Lock-free and allocation-free: an interrupt handler calls it (see the
/// argument in [`crate::intr`]).
pub(crate) fn kick(sched: &Sched) {
    // SeqCst: after the work was published (the poster's push, or
    // startm's wantm), before the loads of the argument.
    fence(Ordering::SeqCst);
    if sched.npidle.load(Ordering::SeqCst) == 0 || sched.nmspinning.load(Ordering::SeqCst) != 0 {
        return;
    }
    let mut timer = false;
    // Acquire: pairs with mregister's release.
    let mut n = sched.cpus.mlist.load(Ordering::Acquire);
    while !n.is_null() {
        // SAFETY: list nodes and their Ms live as long as the scheduler;
        // only atomics of the M are touched.
        unsafe {
            let mp = (*n).m;
            match (*mp).sleeping.load(Ordering::SeqCst) {
                IDLE if notekick(sched.platform, &(*mp).park) => return,
                TIMER => timer = true,
                _ => {}
            }
            n = (*n).next;
        }
    }
    if timer {
        crate::time::netpollbreak(sched);
    }
}
