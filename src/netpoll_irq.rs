//! The bare-metal network poller: device event sources that interrupt
//! handlers make ready (Go's per-platform `netpoll_*.go`, for a platform
//! whose "kernel" is its own interrupt handlers).
//!
//! It implements the [`Netpoll`] contract of [`crate::netpoll`] with no
//! operating system underneath, so the generic half — [`PollDesc`], its
//! slots and deadlines, `findrunnable`'s non-blocking poll, the idle M
//! blocking in `netpoll(delay)` with the next timer folded in — is the
//! same as for hosted sockets:
//!
//! - a source is an [`IrqSource`], a `'static` object of the kernel's (one
//!   per device event: "frame received", "transmit ring has room");
//! - [`IrqSource::wait`] parks the calling goroutine on the source's
//!   [`PollDesc`], with an optional time-out, exactly as a socket read
//!   parks on `EAGAIN`; the first wait arms the source (`netpollopen`);
//! - [`IrqSource::signal`], from an interrupt handler, records readiness
//!   (edge-triggered: "readable", "writable") and queues the source on
//!   its poller's *ready list*, lock-free and allocation-free;
//! - `netpoll(delay)` takes the ready list and hands each source to
//!   [`netpollready`], which yields the goroutines that waited; with
//!   nothing ready it blocks in the platform's `futexsleep` on the
//!   poller's word for at most `delay` — on a kernel, `hlt` with the APIC
//!   one-shot for the time-out: the idle CPU halts until an interrupt or
//!   the next timer;
//! - `netpollbreak` bumps that word and wakes the CPU blocked on it
//!   (`futexwakeup`: an IPI).
//!
//! [`install`] makes a scheduler's poller (Go's `netpollinit`), once, at
//! boot; the scheduler must be `'static` since handlers reach it at any
//! time. A scheduler has one poller: one with this poller has no epoll
//! for `gokernel::net` sockets, and an [`IrqSource`] waited on from a
//! scheduler with epoll fails with [`WaitError::Poller`]`(`[`EBADF`]`)`.
//!
//! # How the ready list reaches an M
//!
//! The poller's ready list is where interrupts leave readiness, as the
//! kernel's own lists are for epoll. Someone must then call `netpoll`. The
//! signalling handler, after queueing the source, looks at whether an M
//! is blocked in the poller: if one is, it wakes it (the blocked `netpoll`
//! returns with the source: Go's blocking netpoll in `findRunnable`); if
//! none is, it posts the poller's *poll request*, an
//! [`IrqWork`] on the scheduler's injection list of
//! [`crate::intr`], whose function calls `netpoll(0)` on an M holding a P
//! and readies what it returns. So the injection list of `intr` is reused
//! as the way to reach an M that is running, spinning or idle — its kick
//! and its no-lost-wake-up argument — while the readiness itself stays in
//! the poller and is only ever reported by `netpoll`. Busy Ms drain the
//! injection list at each scheduling point (the top of `findrunnable`),
//! so a source signalled while every CPU runs goroutines readies its
//! waiter at the next scheduling point, not when a CPU goes idle (Go's
//! sysmon poll, which a kernel has not, would be the other way).
//!
//! [`IrqEvent`](crate::intr::IrqEvent) stays the minimal primitive beside
//! it: one waiter, no time-out, no poller to install, its own node on the
//! injection list. Use an `IrqSource` for a driver that needs a deadline
//! ("the device did not answer in 10 ms"), two directions, or several
//! goroutines taking turns.
//!
//! # No lost wake-up
//!
//! The goroutine's side is [`crate::netpoll`]'s ("No lost wake-up"):
//! whatever `netpoll` reports goes through `netpollready`, which either
//! finds the goroutine parked in the slot, or leaves "ready" there for
//! the wait that comes, and while a goroutine waits some M polls (the
//! timer sleeper counts the waiter as a timer at +∞). What is left is the
//! path from the handler to a `netpoll` that sees the source. All
//! accesses below are sequentially consistent.
//!
//! - **The source's word.** `state` holds the pending directions and
//!   `QUEUED` ("on the ready list, or about to be"). A signal ORs its
//!   directions in; if `QUEUED` was set, the drain that will take the
//!   source off the list has not swapped the word yet (the swap clears
//!   `QUEUED` and takes the directions in one step) and will take these
//!   too. Otherwise the signaller sets `QUEUED` and, if it set it first,
//!   pushes the source; the drain reads the source's `next` before its
//!   swap, so a push after the swap cannot corrupt the list being walked.
//! - **Before the source is armed** (no poller yet), a signal leaves its
//!   directions in `state` and returns. Arming (`netpollopen`) stores the
//!   poller, then reads `state`; the signaller ORs into `state`, then
//!   reads the poller. One sees the other: the arming queues the source,
//!   or the signal does (whoever sets `QUEUED` first).
//! - **The M blocked in the poller.** `netpoll(delay)` increments
//!   `blocked`, reads the word `wake`, then looks at the break flag and at
//!   the ready list, and sleeps on `wake` (`futexsleep` compares it with
//!   the value read); after the sleep it decrements `blocked` and drains.
//!   The signaller pushes, bumps `wake`, then reads `blocked`. If the M's
//!   look at the list missed the push, its read of `wake` came before the
//!   bump, so its sleep returns at once, or the signaller, reading
//!   `blocked` after the M's increment, sees it and calls `futexwakeup`,
//!   which ends the sleep (the platform's futex contract). An M leaving
//!   the poller that the signaller still counted drains after its
//!   decrement, which comes after the signaller's read: it sees the push.
//! - **No M blocked.** The signaller read `blocked == 0`, so any M that
//!   blocks later looks at the list after the push and sees it. And it
//!   posts the poll request: by [`crate::intr`]'s argument, an M holding a
//!   P runs it at its next scheduling point, or an idle M is kicked and
//!   takes an idle P to run it (the M asleep as the timer sleeper is
//!   kicked through `netpollbreak`, which wakes it here).
//! - **Breaks** (`netpollbreak`: an earlier timer, a goroutine readied for
//!   the sleeping M, shutdown) set a flag, then bump `wake` and read
//!   `blocked` as a signal does; the sleeper consumes the flag before it
//!   sleeps. So a break lands on the `netpoll` blocked now or on the next
//!   one to block, as the contract says; a non-blocking `netpoll(0)` does
//!   not consume it.
//!
//! Deadlines need nothing of their own: a wait with a time-out adds a
//! timer (`crate::netpoll`), the timer sleeper's delay is the earliest
//! timer, so the CPU blocked here wakes at the deadline (its
//! `futexsleep` time-out), runs the timer, and the wait ends with
//! [`WaitError::Timeout`].
//!
//! # Interrupt safety
//!
//! [`IrqSource::signal`] touches the source's atomics, pushes with one
//! compare-and-swap, and then either calls the platform's `futexwakeup`
//! (which `docs/interrupts.md` requires to be interrupt-safe: an IPI) or
//! posts an `IrqWork` (interrupt-safe by `intr`'s rules). No lock, no
//! allocation, no queue only an owner may touch. Everything that
//! allocates or locks — the source's `PollDesc`, its descriptor number,
//! arming — happens in [`IrqSource::wait`], in a goroutine.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use core::time::Duration;

use crate::intr::IrqWork;
use crate::netpoll::{
    MODE_R, MODE_W, Netpoll, PollDesc, PollTag, ReadyList, WaitError, netpollready,
};
use crate::runtime2::Sched;

/// [`Netpoll::netpollopen`]'s error for a descriptor number that names no
/// [`IrqSource`] (Linux's number).
pub const EBADF: i32 = 9;
/// [`Netpoll::netpollopen`]'s error for a source armed with another
/// scheduler's poller already (Linux's number).
pub const EBUSY: i32 = 16;
/// [`Netpoll::netpollopen`]'s error for a tag that is not the source's
/// own (Linux's number).
pub const EINVAL: i32 = 22;

/// The first descriptor number of an [`IrqSource`]: above any `i32`, so a
/// source can never be taken for an operating system's file descriptor
/// (hosted, epoll refuses it with `EBADF`).
const FD_BASE: usize = 1 << 32;

/// `IrqSource::state`: the directions, and "on the ready list".
const MODES: u32 = (MODE_R | MODE_W) as u32;
const QUEUED: u32 = 4;

/// Every source that has been waited on, by descriptor number −
/// [`FD_BASE`]. Sources are `'static`; the list only grows. Locked only
/// in goroutines (first wait, arming), never by a handler.
static SOURCES: spin::Mutex<Vec<&'static IrqSource>> = spin::Mutex::new(Vec::new());

/// A device event source an interrupt handler signals and goroutines wait
/// on through the scheduler's network poller (see the [module
/// docs](self)): the bare-metal counterpart of a socket.
///
/// Readiness is edge-triggered and kept: a signal with nobody waiting
/// makes the next [`wait`](IrqSource::wait) in that direction return at
/// once; signals that arrive before the waiter runs again merge into one
/// wake-up. So a driver loops: wait, then handle everything the device
/// has. Goroutines waiting in one direction take turns.
///
/// # Example
///
/// A kernel's driver, with its handler (the hosted platform and a plain
/// thread stand in for the CPU and the interrupt here):
///
/// ```
/// use core::time::Duration;
/// use gokernel::netpoll::{MODE_R, WaitError};
/// use gokernel::netpoll_irq::{IrqSource, install};
/// use gokernel::platform::hosted::HOSTED;
/// use gokernel::runtime2::Sched;
///
/// static RX: IrqSource = IrqSource::new();
///
/// let sched = Sched::leak(Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED));
/// install(sched).unwrap(); // at boot, before any wait
/// let done = gokernel::chan::<bool>(1);
/// let d = done.clone();
/// sched.go(Box::new(move || {
///     // Nothing signals within 10 ms: the deadline fires.
///     d.send(RX.wait(MODE_R, Some(Duration::from_millis(10))) == Err(WaitError::Timeout)).unwrap();
///     // The "interrupt" below ends this one (or, if it came first, was kept).
///     d.send(RX.wait(MODE_R, None).is_ok()).unwrap();
/// })).unwrap();
/// assert!(done.recv().unwrap()); // timed out
/// RX.signal(MODE_R); // what the interrupt handler calls
/// assert!(done.recv().unwrap()); // woken
/// sched.shutdown();
/// ```
pub struct IrqSource {
    /// Pending directions ([`MODE_R`], [`MODE_W`]) and `QUEUED`.
    state: AtomicU32,
    /// The next source on the poller's ready list.
    next: AtomicPtr<IrqSource>,
    /// The poller it is armed with, null before its first wait.
    poller: AtomicPtr<IrqPoll>,
    /// Its `PollDesc`'s tag ([`PollTag::into_raw`]), 0 before the first
    /// wait.
    tag: AtomicU64,
    /// Its descriptor number, from its first wait.
    fd: spin::Once<usize>,
    /// Its `PollDesc`, from its first wait (never freed).
    pd: spin::Once<&'static PollDesc>,
}

impl Default for IrqSource {
    fn default() -> Self {
        Self::new()
    }
}

impl IrqSource {
    /// A source nobody has signalled or waited on.
    pub const fn new() -> Self {
        IrqSource {
            state: AtomicU32::new(0),
            next: AtomicPtr::new(null_mut()),
            poller: AtomicPtr::new(null_mut()),
            tag: AtomicU64::new(0),
            fd: spin::Once::new(),
            pd: spin::Once::new(),
        }
    }

    /// Makes the source ready for `mode` ([`MODE_R`], [`MODE_W`], or both
    /// ORed; other bits are ignored): a goroutine waiting for it is
    /// readied by the scheduler's poller; with none waiting, the next
    /// wait returns at once.
    ///
    /// Interrupt-safe: no lock, no allocation, no owner-only queue (see
    /// the [module docs](self#interrupt-safety)); an interrupt handler may
    /// call it whatever code it interrupted, on any CPU. Also fine from
    /// any thread or goroutine.
    pub fn signal(&'static self, mode: u8) {
        let mode = u32::from(mode) & MODES;
        if mode == 0 {
            return;
        }
        let old = self.state.fetch_or(mode, Ordering::SeqCst);
        if old & QUEUED != 0 {
            // The drain that takes the source off the list takes this too.
            return;
        }
        let p = self.poller.load(Ordering::SeqCst);
        if p.is_null() {
            // Not armed yet: arming queues it (module docs).
            return;
        }
        // SAFETY: pollers are 'static (made only by `install`).
        let p = unsafe { &*p };
        if self.state.fetch_or(QUEUED, Ordering::SeqCst) & QUEUED == 0 {
            p.push(self);
        }
    }

    /// Parks the calling goroutine until the source is signalled for
    /// `mode` ([`MODE_W`] waits for writable, anything else for readable)
    /// or `timeout` passes (`None`: no time-out), and consumes the
    /// signal (Go's `poll_runtime_pollWait`). Returns at once if a signal
    /// came since the last wait in that direction. While it waits the
    /// goroutine holds no M: its CPU runs other goroutines, or halts.
    ///
    /// The first wait gives the source its [`PollDesc`] and descriptor
    /// number, and arms it with the scheduler's poller (a signal before
    /// that is kept).
    ///
    /// # Errors
    ///
    /// - [`WaitError::Timeout`] when `timeout` passed with no signal;
    /// - [`WaitError::NotGoroutine`] outside a goroutine of a scheduler;
    /// - [`WaitError::Poller`] when the scheduler has no poller
    ///   (no [`install`]: error number 0) or one that is not this module's
    ///   (hosted, epoll: [`EBADF`]), or the source is armed with another
    ///   scheduler's poller ([`EBUSY`]).
    pub fn wait(&'static self, mode: u8, timeout: Option<Duration>) -> Result<(), WaitError> {
        let gp = crate::proc::current_user_g();
        if gp.is_null() {
            return Err(WaitError::NotGoroutine);
        }
        // SAFETY: a user G of a scheduler: its M and scheduler are live.
        let sched = unsafe { &*(*(*gp).m).rt };
        let pd = *self.pd.call_once(|| {
            let pd = PollDesc::alloc();
            self.tag.store(pd.tag().into_raw(), Ordering::SeqCst);
            pd
        });
        let fd = *self.fd.call_once(|| {
            let mut all = SOURCES.lock();
            all.push(self);
            FD_BASE + all.len() - 1
        });
        let deadline = match timeout {
            None => 0,
            Some(d) => {
                let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                sched.platform.nanotime().saturating_add(ns).max(1)
            }
        };
        pd.wait(fd, mode, deadline)
    }
}

/// The bare-metal poller of one scheduler (see the [module docs](self)).
/// Made by [`install`]; it lives as long as its scheduler, for good.
pub struct IrqPoll {
    /// Its scheduler (for the platform's futex and the poll request).
    sched: &'static Sched,
    /// Sources made ready since the last drain: a lock-free stack, newest
    /// first, taken whole with one swap (no ABA).
    ready: AtomicPtr<IrqSource>,
    /// The word an M blocked in `netpoll` sleeps on; bumped to wake it.
    wake: AtomicU32,
    /// Ms in `netpoll`'s blocking section.
    blocked: AtomicU32,
    /// A `netpollbreak` not yet consumed by a blocking `netpoll`.
    brk: AtomicBool,
    /// The poll request: `netpoll(0)` on an M holding a P, through the
    /// injection list of `crate::intr`.
    poke: IrqWork,
}

/// [`install`]: the scheduler has a poller already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollerExists;

impl core::fmt::Display for PollerExists {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("the scheduler has a network poller already")
    }
}

/// Makes `sched`'s poller the interrupt-driven one (Go's `netpollinit`):
/// from now on goroutines of `sched` wait on [`IrqSource`]s. Call it once,
/// at boot, before the first wait (the [`IrqSource`] example shows it).
///
/// # Errors
///
/// [`PollerExists`] if `sched` has a poller already (installed before, or,
/// hosted, the epoll poller made by a socket's first wait).
pub fn install(sched: &'static Sched) -> Result<&'static IrqPoll, PollerExists> {
    let b = Box::new(IrqPoll {
        sched,
        ready: AtomicPtr::new(null_mut()),
        wake: AtomicU32::new(0),
        blocked: AtomicU32::new(0),
        brk: AtomicBool::new(false),
        poke: IrqWork::new(poll_now),
    });
    let p: *const IrqPoll = &*b;
    match crate::netpoll::netpollinit(sched, b) {
        // SAFETY: the box now belongs to a 'static scheduler, which never
        // drops or replaces its poller.
        Ok(()) => Ok(unsafe { &*p }),
        Err(_) => Err(PollerExists),
    }
}

impl IrqPoll {
    /// Ms blocked in this poller now (`netpoll` with a delay): on a kernel,
    /// halted CPUs waiting for a source or the next timer. For tests and
    /// statistics; it may change as soon as it is read.
    pub fn blocked(&self) -> u32 {
        self.blocked.load(Ordering::SeqCst)
    }

    /// Pushes `src` (whose `QUEUED` the caller set) on the ready list and
    /// makes sure an M polls. Interrupt-safe.
    fn push(&'static self, src: &'static IrqSource) {
        let n = src as *const IrqSource as *mut IrqSource;
        let mut head = self.ready.load(Ordering::Relaxed);
        loop {
            src.next.store(head, Ordering::Relaxed);
            match self
                .ready
                .compare_exchange_weak(head, n, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        self.wake.fetch_add(1, Ordering::SeqCst);
        if self.blocked.load(Ordering::SeqCst) != 0 {
            // An M blocked in netpoll: it returns with the source.
            self.sched.platform.futexwakeup(&self.wake, u32::MAX);
        } else {
            // None: an M holding a P polls (crate::intr's argument).
            self.poke.post(self.sched);
        }
    }

    /// Takes the ready list and reports each source (oldest first).
    fn drain(&self, list: &mut ReadyList) {
        let mut n = self.ready.swap(null_mut(), Ordering::SeqCst);
        let mut fifo: *mut IrqSource = null_mut();
        while !n.is_null() {
            // SAFETY: sources on the list are 'static (push takes them so).
            let src = unsafe { &*n };
            let next = src.next.load(Ordering::Relaxed);
            src.next.store(fifo, Ordering::Relaxed);
            fifo = n;
            n = next;
        }
        while !fifo.is_null() {
            // SAFETY: as above.
            let src = unsafe { &*fifo };
            // Read before the swap: from the swap on, a signal may push
            // the source again.
            let next = src.next.load(Ordering::Relaxed);
            let mode = src.state.swap(0, Ordering::SeqCst) & MODES;
            if mode != 0 {
                // SAFETY: a queued source is armed, and its tag came from
                // its own PollDesc (PollDesc::tag).
                let tag = unsafe { PollTag::from_raw(src.tag.load(Ordering::SeqCst)) };
                netpollready(list, tag, mode as u8);
            }
            fifo = next;
        }
    }
}

impl Netpoll for IrqPoll {
    /// Arms the [`IrqSource`] numbered `fd`: binds it to this poller and
    /// queues it if it was signalled before.
    fn netpollopen(&self, fd: usize, tag: PollTag) -> Result<(), i32> {
        let src = fd
            .checked_sub(FD_BASE)
            .and_then(|i| SOURCES.lock().get(i).copied())
            .ok_or(EBADF)?;
        if src.tag.load(Ordering::SeqCst) != tag.into_raw() {
            return Err(EINVAL);
        }
        // SAFETY: every IrqPoll is made by `install` and owned by a
        // 'static scheduler that never drops it.
        let me: &'static IrqPoll = unsafe { &*(self as *const IrqPoll) };
        let mp = me as *const IrqPoll as *mut IrqPoll;
        match src
            .poller
            .compare_exchange(null_mut(), mp, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => {}
            Err(p) if p == mp => {}
            Err(_) => return Err(EBUSY),
        }
        // Signals before the poller was stored (module docs).
        if src.state.load(Ordering::SeqCst) & MODES != 0
            && src.state.fetch_or(QUEUED, Ordering::SeqCst) & QUEUED == 0
        {
            me.push(src);
        }
        Ok(())
    }

    fn netpoll(&self, delay: i64, list: &mut ReadyList) {
        self.drain(list);
        if delay == 0 || !list.is_empty() {
            return;
        }
        self.blocked.fetch_add(1, Ordering::SeqCst);
        let seen = self.wake.load(Ordering::SeqCst);
        if !self.brk.swap(false, Ordering::SeqCst) && self.ready.load(Ordering::SeqCst).is_null() {
            // delay < 0: until woken.
            let timeout = u64::try_from(delay).ok();
            self.sched.platform.futexsleep(&self.wake, seen, timeout);
        }
        self.blocked.fetch_sub(1, Ordering::SeqCst);
        self.drain(list);
    }

    fn netpollbreak(&self) {
        self.brk.store(true, Ordering::SeqCst);
        self.wake.fetch_add(1, Ordering::SeqCst);
        if self.blocked.load(Ordering::SeqCst) != 0 {
            self.sched.platform.futexwakeup(&self.wake, u32::MAX);
        }
    }
}

/// The poll request's function (an `IrqWork`, on g0 of an M holding a P
/// of the scheduler whose injection list it was on): polls without
/// blocking and readies what it finds.
fn poll_now() {
    let gp = crate::tls::getg();
    // SAFETY: IrqWork functions run on g0 of an M of a scheduler (intr's
    // contract): its M and scheduler are live.
    let sched = unsafe { &*(*(*gp).m).rt };
    if let Some(poller) = crate::netpoll::netpollinited(sched) {
        let mut list = ReadyList::new();
        poller.netpoll(0, &mut list);
        // SAFETY: the Gs came out of their slots (netpollready).
        unsafe { list.readyall() };
    }
}
