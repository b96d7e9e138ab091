//! The network poller (Go's `netpoll.go`): goroutines that wait for a file
//! descriptor — or, on bare metal, any event source — without holding an M.
//!
//! # The contract
//!
//! A poller implements [`Netpoll`], Go's platform half of the poller, with
//! Go's names:
//!
//! - `netpollinit`: making the poller (hosted: `Epoll::new` in
//!   `netpoll_epoll`, made on first use by `netpollgenericinit`; bare
//!   metal, [`crate::netpoll_irq`], whose sources interrupt handlers
//!   signal, installed at boot; a kernel may install its own with
//!   [`netpollinit`]);
//! - [`netpollopen`](Netpoll::netpollopen): arm a source, edge-triggered,
//!   for reading and writing, reporting readiness under a [`PollTag`];
//! - [`netpoll`](Netpoll::netpoll)`(delay)`: wait at most `delay`
//!   nanoseconds (`< 0`: until something happens, `0`: not at all) and
//!   hand every source that became ready to [`netpollready`], which turns
//!   it into the goroutines that waited for it (a [`ReadyList`]);
//! - [`netpollbreak`](Netpoll::netpollbreak): make a `netpoll` that is
//!   blocked, or the next one, return soon.
//!
//! The generic half is here: [`PollDesc`] (Go's `pollDesc`), one per
//! source, with a slot per direction (`rg`, `wg`) that holds nothing, "ready",
//! "a goroutine is about to wait", the waiting G, or "a waker is readying
//! the G it took out" (so that the G, and its scheduler, outlive the
//! waker's use of them: see `netpollblock`); parking on it
//! (`netpollblock`), waking from it (`netpollunblock`, [`netpollready`]),
//! deadlines, and closing ([`PollDesc::evict`], Go's `poll_runtime_pollUnblock`).
//! The sockets of `gokernel::net` are built on it.
//!
//! # Where the scheduler polls
//!
//! As in Go's `findRunnable`:
//!
//! - before stealing, an M that found nothing in its own queues polls
//!   without blocking (`netpoll(0)`) if goroutines wait on the poller and
//!   no M is blocked in it (`findrunnable_netpoll`), and readies what it
//!   gets;
//! - the last idle M blocks in `netpoll(delay)` instead of its futex
//!   sleep. That M is the timer sleeper of [`crate::time`] (Go's idle M
//!   polls "until the next timer" too): a goroutine waiting on the poller
//!   counts, for the sleeper, as a timer that never fires
//!   (`timesleepuntil` reports `MAX_WHEN` when there are waiters and no
//!   timer), so the sleeper exists while anything waits, its delay is the
//!   next timer's deadline (or none), and `wakenetpoller` / `netpollbreak`
//!   interrupt it as they did the futex. What it gets is readied after it
//!   leaves the post: with an idle P taken as a spinning M (it then runs
//!   them, and hands the search on), or without one (bound Gs go to their
//!   Ms, others to the global queue, as Go's `injectglist`).
//!
//! Readied goroutines go through `ready`, so a started goroutine — bound
//! to its M by default ([`crate::bound`]) — continues on its own thread:
//! its M is woken (an idle P given to it, or `mwantp`) by the poller's M.
//!
//! # No lost wake-up
//!
//! A goroutine parks on a source in three steps, Go's: it stores "about
//! to wait" (`PD_WAIT`) in the slot, checks for a close and its deadline,
//! and parks; on g0, `netpollblockcommit` counts it in `waiters`
//! (SeqCst) and then replaces `PD_WAIT` with the G (compare-and-swap).
//! Readiness (the poller), a close and a deadline timer each change the
//! slot with one atomic swap after publishing their reason (closing flag,
//! the clock), so either the goroutine sees the reason before it parks, or
//! the swap sees `PD_WAIT` (the commit then fails and the goroutine does
//! not park) or the G (and readies it). A source armed after the
//! goroutine found it not ready reports its current state when it is
//! armed (epoll's `EPOLL_CTL_ADD` does), so readiness between the failed
//! system call and the arming is not lost either. (On bare metal, the path
//! from an interrupt handler to a `netpoll` that reports the source is
//! argued in [`crate::netpoll_irq`].)
//!
//! That leaves making sure *some* M polls while a goroutine waits. The
//! commit, having counted the G in `waiters`, reads the timer sleeper's
//! `poll_until` as `addtimer` does for a timer at +∞ (`wakenetpoller`):
//! nobody there → `wakep`; a sleeper still reading the deadlines →
//! `netpollbreak`; a sleeper asleep → it is blocked in `netpoll` already
//! (with the source armed, which wakes it). The sleeper stores
//! `poll_until` before each scan of the deadlines and `waiters`, all
//! sequentially consistent: the argument of [`crate::time`] ("No lost
//! wake-up") with the waiter as the timer, unchanged, including the two
//! things it needs from the rest of the scheduler (every M that idles a
//! P scans `timesleepuntil` afterwards; every M that takes an idle P
//! spins). `checkdead` reports no deadlock while goroutines wait on the
//! poller, for the same reason it reports none while a timer is pending.
//!
//! The sleeper may have chosen its futex before the first goroutine made
//! the poller (it is made on first use). `netpollbreak` bumps the
//! sleeper's futex word and then, if the poller exists, breaks it, else
//! wakes the futex; the sleeper reads the word, then whether the poller
//! exists, and if it does, reads the word again before it blocks in
//! `netpoll`: a bump it missed breaks the poller, since the breaker's
//! check came after the poller was made. Making the poller ends with a
//! futex wake-up, so a sleeper that chose the futex before wakes and
//! chooses again.
//!
//! # Limits
//!
//! - A goroutine that waits while every P is held by a goroutine that
//!   never yields is readied when one of them yields, parks or ends (as a
//!   timer in that state fires late: there is no preemption and no
//!   `sysmon` poll yet).
//! - One goroutine per direction waits on a source at a time; the socket
//!   layer serializes the others (Go's `fdMutex`).
//! - `PollDesc`s are never freed, only reused (Go's `pollCache` does the
//!   same): an event read from the poller just before a close may still
//!   name one, and its sequence number, in the tag, tells it is stale.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::runtime2::{G, GQueue, Sched};

/// A direction: readable.
pub const MODE_R: u8 = 1;
/// A direction: writable.
pub const MODE_W: u8 = 2;

/// A slot: nothing.
const PD_NIL: usize = 0;
/// A slot: the source became ready and nobody has consumed it.
const PD_READY: usize = 1;
/// A slot: a goroutine is about to park.
const PD_WAIT: usize = 2;
/// A slot: a waker took the parked G out and is readying it; it stores
/// `PD_NIL` (a close, a deadline) or `PD_READY` (readiness) when it is
/// done with the G and its scheduler (`netpollfinish`).
const PD_WAKING: usize = 3;
/// A slot: as `PD_WAKING`, and the source became ready meanwhile: the
/// waker stores `PD_READY` when it is done. (Any value from 8 on: the G
/// that parked; Gs are 8-byte aligned.)
const PD_WAKING_READY: usize = 4;

/// The platform half of the poller (Go's `netpollinit`, `netpollopen`,
/// `netpoll`, `netpollBreak`): hosted, epoll; a kernel implements it over
/// its interrupts (a source is whatever its `fd` numbers name).
///
/// Any thread may call any method, several at once: `netpoll(0)` from Ms
/// looking for work while one M blocks in `netpoll(delay)`.
pub trait Netpoll: Send + Sync {
    /// Arms source `fd` (Go's `netpollopen`): from now on, each time it
    /// becomes readable or writable (edge-triggered), or has an error or a
    /// hang-up, a `netpoll` reports `tag` with the directions. If it is
    /// ready when armed, that counts as becoming ready. Arming a source
    /// armed already is not an error.
    ///
    /// # Errors
    ///
    /// The platform's error number (hosted: the `errno` of `epoll_ctl(2)`,
    /// or `EBADF` for an `fd` that is not a descriptor number) when the
    /// source cannot be armed; [`PollDesc::wait`] returns it as
    /// [`WaitError::Poller`].
    fn netpollopen(&self, fd: usize, tag: PollTag) -> Result<(), i32>;
    /// Waits at most `delay` nanoseconds (`< 0`: until a source becomes
    /// ready or [`netpollbreak`](Netpoll::netpollbreak) is called; `0`:
    /// not at all) and calls [`netpollready`] for each source that became
    /// ready (Go's `netpoll`). It may return early with nothing.
    fn netpoll(&self, delay: i64, list: &mut ReadyList);
    /// Makes a `netpoll` blocked now, or the next one to block, return
    /// soon (Go's `netpollBreak`).
    fn netpollbreak(&self);
}

/// What a poller reports a source by: a [`PollDesc`] and its generation
/// (a source closed since it was armed reports nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollTag(u64);

impl PollTag {
    /// The tag as a number (to store in the poller's event records).
    pub fn into_raw(self) -> u64 {
        self.0
    }

    /// The tag back from [`into_raw`](PollTag::into_raw).
    ///
    /// # Safety
    ///
    /// `raw` came from `into_raw` of a tag a `netpollopen` was given.
    pub unsafe fn from_raw(raw: u64) -> PollTag {
        PollTag(raw)
    }

    /// The descriptor, if the tag is current.
    fn pd(self) -> Option<&'static PollDesc> {
        // Bits 0..48: the pointer (canonical, sign-extended from bit 47);
        // 48..64: the low bits of the sequence number.
        let ptr = (((self.0 << 16) as i64) >> 16) as usize as *const PollDesc;
        // SAFETY: tags are made only from live PollDescs (PollDesc::tag),
        // and PollDescs are never freed (pollcache).
        let pd = unsafe { &*ptr };
        let seq = (self.0 >> 48) as u32;
        (pd.seq.load(Ordering::Acquire) & 0xffff == seq).then_some(pd)
    }
}

/// The goroutines a `netpoll` found ready (Go's `gList` with the waiter
/// count's delta).
pub struct ReadyList {
    q: GQueue,
}

impl ReadyList {
    /// Empty.
    pub(crate) fn new() -> Self {
        ReadyList { q: GQueue::new() }
    }

    /// How many goroutines it holds.
    pub fn len(&self) -> usize {
        self.q.size
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.q.size == 0
    }

    /// Readies every G (through `ready`: bound Gs to their Ms).
    ///
    /// # Safety
    ///
    /// The Gs came out of slots (they are parked and ours to ready).
    pub(crate) unsafe fn readyall(&mut self) {
        loop {
            let gp = crate::bound::gqueue_pop(&mut self.q);
            if gp.is_null() {
                return;
            }
            // SAFETY: the contract: a G netpollready took out of its slot
            // (which it recorded), now PD_WAKING: it stays parked, and
            // its scheduler live, until netpollfinish.
            unsafe {
                let slot = (*gp).pollslot;
                netpollready_g(gp);
                netpollfinish(&*slot, true);
            }
        }
    }
}

impl Drop for ReadyList {
    fn drop(&mut self) {
        if !self.q.head.is_null() {
            crate::panic::throw("netpoll: a list of ready goroutines was dropped");
        }
    }
}

/// A deadline of one direction of a [`PollDesc`].
struct Deadline {
    /// The deadline of the wait under way (`nanotime`), 0 for none.
    when: u64,
    /// The deadline of the timer outstanding, 0 for none.
    timer: u64,
}

/// One source (Go's `pollDesc`). Never freed; reused after a close.
pub struct PollDesc {
    /// The read slot: `PD_NIL`, `PD_READY`, `PD_WAIT` or a G.
    rg: AtomicUsize,
    /// The write slot.
    wg: AtomicUsize,
    /// Bumped when the descriptor is freed: events of an earlier life are
    /// ignored.
    seq: AtomicU32,
    /// Set by `evict`: every wait fails.
    closing: AtomicBool,
    /// The poller it is armed with (`NetpollState::id`), 0: none.
    pollid: AtomicU64,
    /// Read and write deadlines.
    deadlines: [spin::Mutex<Deadline>; 2],
    /// Goroutines waiting to read (or write) take turns (Go's `fdMutex`).
    turns: [crate::sync::Mutex<()>; 2],
}

/// Why [`PollDesc::wait`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitError {
    /// The source was closed ([`PollDesc::evict`]).
    Closed,
    /// The deadline passed.
    Timeout,
    /// Not called from a goroutine of a scheduler.
    NotGoroutine,
    /// The scheduler has no poller, or it could not arm the source (the
    /// platform's error number; hosted, `errno`).
    Poller(i32),
}

impl core::fmt::Display for WaitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            WaitError::Closed => f.write_str("use of closed network connection"),
            WaitError::Timeout => f.write_str("i/o timeout"),
            WaitError::NotGoroutine => f.write_str("PollDesc::wait called outside a goroutine"),
            WaitError::Poller(e) => write!(f, "the network poller failed (error {e})"),
        }
    }
}

/// Free PollDescs (Go's `pollCache`).
static POLLCACHE: spin::Mutex<Vec<&'static PollDesc>> = spin::Mutex::new(Vec::new());

impl PollDesc {
    /// A descriptor for a new source (Go's `pollCache.alloc`). Give it
    /// back with [`free`](PollDesc::free) after the source is closed.
    pub fn alloc() -> &'static PollDesc {
        let pd = POLLCACHE.lock().pop().unwrap_or_else(|| {
            let pd: &'static PollDesc = Box::leak(Box::new(PollDesc {
                rg: AtomicUsize::new(PD_NIL),
                wg: AtomicUsize::new(PD_NIL),
                seq: AtomicU32::new(0),
                closing: AtomicBool::new(false),
                pollid: AtomicU64::new(0),
                deadlines: [const { spin::Mutex::new(Deadline { when: 0, timer: 0 }) }; 2],
                turns: [const { crate::sync::Mutex::new(()) }; 2],
            }));
            let addr = pd as *const PollDesc as usize;
            if (((addr << 16) as i64) >> 16) as usize != addr {
                crate::panic::throw("netpoll: a PollDesc's address does not fit a tag (48 bits)");
            }
            pd
        });
        pd.closing.store(false, Ordering::SeqCst);
        pd
    }

    /// Gives the descriptor back (Go's `pollCache.free`) once its source
    /// is closed (disarmed): a goroutine still waiting on it is woken
    /// with [`WaitError::Closed`] first, and events of the source still in
    /// flight are ignored from here on.
    pub fn free(&'static self) {
        self.evict();
        self.seq.fetch_add(1, Ordering::Release);
        // Readiness of the old source goes; anything else is left: a
        // waker still readying a G finishes its slot itself (and the G
        // waits for that), and a G a misuse left parked here stays in it
        // (a wait that finds it fails as "two goroutines wait").
        for slot in [&self.rg, &self.wg] {
            let _ = slot.compare_exchange(PD_READY, PD_NIL, Ordering::SeqCst, Ordering::SeqCst);
        }
        self.pollid.store(0, Ordering::Relaxed);
        for d in &self.deadlines {
            d.lock().when = 0;
        }
        POLLCACHE.lock().push(self);
    }

    /// The tag a poller reports it by.
    pub fn tag(&self) -> PollTag {
        let addr = self as *const PollDesc as u64 & 0xffff_ffff_ffff;
        let seq = u64::from(self.seq.load(Ordering::Relaxed) & 0xffff);
        PollTag(addr | seq << 48)
    }

    /// The slot of direction `mode`.
    fn slot(&self, mode: u8) -> &AtomicUsize {
        if mode == MODE_R { &self.rg } else { &self.wg }
    }

    /// Whether it was closed ([`evict`](PollDesc::evict)).
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Closes the descriptor for waiting (Go's `poll_runtime_pollUnblock`):
    /// every wait under way ends with [`WaitError::Closed`], and so does
    /// every later one. From any thread.
    pub fn evict(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for mode in [MODE_R, MODE_W] {
            netpollwake(self, mode);
        }
    }

    /// Parks the current goroutine until source `fd` (armed now with its
    /// scheduler's poller, if it is not yet) may be ready for `mode`
    /// ([`MODE_R`] or [`MODE_W`]), or `deadline` (a reading of the
    /// scheduler's `Platform::nanotime`, 0 for none) passes, or the
    /// descriptor is evicted (Go's `poll_runtime_pollWait`). `Ok` may be
    /// spurious: try the operation again. Goroutines waiting in one
    /// direction take turns.
    ///
    /// Hosted, the scheduler's epoll poller is made on first use; without
    /// `std` the scheduler needs one from [`netpollinit`].
    ///
    /// # Errors
    ///
    /// - [`WaitError::NotGoroutine`] when not called from a goroutine of a
    ///   scheduler (nothing is armed);
    /// - [`WaitError::Poller`] when the scheduler has no poller (without
    ///   `std`, none installed: error number 0), the poller cannot be made
    ///   (hosted: the `errno` of `epoll_create1(2)`, `eventfd(2)` or
    ///   `epoll_ctl(2)`), or it cannot arm the source
    ///   ([`Netpoll::netpollopen`]'s error);
    /// - [`WaitError::Closed`] when the descriptor was evicted before or
    ///   during the wait (checked first, after the goroutine wakes);
    /// - [`WaitError::Timeout`] when `deadline` has passed when the
    ///   goroutine wakes and the source did not become ready.
    pub fn wait(&'static self, fd: usize, mode: u8, deadline: u64) -> Result<(), WaitError> {
        let gp = crate::proc::current_user_g();
        if gp.is_null() {
            return Err(WaitError::NotGoroutine);
        }
        // SAFETY: a user G of a scheduler: its M and scheduler are live.
        let sched = unsafe { &*(*(*gp).m).rt };
        #[cfg(feature = "std")]
        let poller = netpollgenericinit(sched).map_err(WaitError::Poller)?;
        #[cfg(not(feature = "std"))]
        let poller = netpollinited(sched).ok_or(WaitError::Poller(0))?;
        netpollarm(sched, poller, self, fd).map_err(WaitError::Poller)?;
        let mode = if mode == MODE_R { MODE_R } else { MODE_W };
        let ready = {
            let _turn = self.turns[usize::from(mode == MODE_W)].lock();
            // SAFETY: a user G of `sched`; its turn makes it the only
            // waiter; the source is armed with sched's poller.
            unsafe { netpollblock(sched, self, mode, deadline) }
        };
        if self.closing() {
            return Err(WaitError::Closed);
        }
        // Readiness consumed here is reported even if the deadline has
        // passed too (Go's pollWait): an edge of a device source
        // (netpoll_irq) would be lost otherwise.
        if !ready && deadline != 0 && sched.platform.nanotime() >= deadline {
            return Err(WaitError::Timeout);
        }
        Ok(())
    }
}

/// A scheduler's poller and the goroutines waiting on it.
pub(crate) struct NetpollState {
    /// The poller, made on first use.
    poller: spin::Once<Box<dyn Netpoll>>,
    /// Set (SeqCst) once `poller` is there (module docs: the sleeper's
    /// choice between its futex and the poller).
    inited: AtomicBool,
    /// Goroutines parked on sources of this scheduler (Go's
    /// `netpollWaiters`).
    waiters: AtomicI64,
    /// This poller's identity (`PollDesc::pollid`).
    id: u64,
}

/// Poller ids.
static POLLIDS: AtomicU64 = AtomicU64::new(1);

impl NetpollState {
    /// No poller yet.
    pub(crate) fn new() -> Self {
        NetpollState {
            poller: spin::Once::new(),
            inited: AtomicBool::new(false),
            waiters: AtomicI64::new(0),
            id: POLLIDS.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// Installs `poller` as `sched`'s poller (Go's `netpollinit`): for a
/// kernel, before its goroutines wait on sources; hosted, the epoll
/// poller is made on first use instead. Gives `poller` back if the
/// scheduler has one already.
///
/// # Errors
///
/// `Err(poller)`, handing `poller` back unused, if the scheduler has a
/// poller already (installed before, or, hosted, made on first use).
///
/// # Panics
///
/// Only if an earlier attempt to make the scheduler's poller panicked
/// (`spin::Once` is then poisoned). The `expect` inside cannot fire: the
/// closure it is in runs at most once.
pub fn netpollinit(sched: &Sched, poller: Box<dyn Netpoll>) -> Result<(), Box<dyn Netpoll>> {
    let mut poller = Some(poller);
    sched
        .netpoll
        .poller
        .call_once(|| poller.take().expect("call_once runs its closure once"));
    match poller {
        Some(p) => Err(p),
        None => {
            netpollinited_now(sched);
            Ok(())
        }
    }
}

/// The poller has just been made: tell the timer sleeper (module docs).
fn netpollinited_now(sched: &Sched) {
    sched.netpoll.inited.store(true, Ordering::SeqCst);
    crate::time::netpollbreak_futex(sched);
}

/// `sched`'s poller, made now if need be (Go's `netpollGenericInit`).
#[cfg(feature = "std")]
pub(crate) fn netpollgenericinit(sched: &Sched) -> Result<&dyn Netpoll, i32> {
    if let Some(p) = sched.netpoll.poller.get() {
        return Ok(&**p);
    }
    let mut made = false;
    let p = sched.netpoll.poller.try_call_once(|| {
        made = true;
        crate::netpoll_epoll::Epoll::new().map(|e| Box::new(e) as Box<dyn Netpoll>)
    })?;
    if made {
        netpollinited_now(sched);
    }
    Ok(&**p)
}

/// `sched`'s poller, if it has one (SeqCst: see the module docs).
pub(crate) fn netpollinited(sched: &Sched) -> Option<&dyn Netpoll> {
    if sched.netpoll.inited.load(Ordering::SeqCst) {
        sched.netpoll.poller.get().map(|p| &**p)
    } else {
        None
    }
}

/// Whether goroutines wait on `sched`'s poller (Go's
/// `netpollAnyWaiters`). SeqCst: the sleeper's scan (module docs).
pub(crate) fn netpollanywaiters(sched: &Sched) -> bool {
    sched.netpoll.waiters.load(Ordering::SeqCst) > 0
}

/// Arms `pd`'s source `fd` with `sched`'s poller if it is not armed there
/// already. A source used from goroutines of two schedulers is armed with
/// both.
fn netpollarm(sched: &Sched, poller: &dyn Netpoll, pd: &PollDesc, fd: usize) -> Result<(), i32> {
    let id = sched.netpoll.id;
    if pd.pollid.load(Ordering::Relaxed) != id {
        poller.netpollopen(fd, pd.tag())?;
        pd.pollid.store(id, Ordering::Relaxed);
    }
    Ok(())
}

/// Hands source `tag`, ready in the directions `mode`, to whatever waits
/// on it (Go's `netpollready`): a goroutine parked on it goes on `list`;
/// otherwise the next wait returns at once. A stale tag (its source closed
/// since) is ignored. For implementations of [`Netpoll::netpoll`].
pub fn netpollready(list: &mut ReadyList, tag: PollTag, mode: u8) {
    let Some(pd) = tag.pd() else { return };
    for m in [MODE_R, MODE_W] {
        if mode & m != 0 {
            let gp = netpollunblock(pd, m, true);
            if !gp.is_null() {
                crate::bound::gqueue_push(&mut list.q, gp);
            }
        }
    }
}

/// Changes `pd`'s slot `mode` for a wake-up (Go's `netpollunblock`):
/// `ioready`, to "ready"; otherwise (a close, a deadline) only a waiting
/// goroutine is taken out. Returns the G that parked there, null if none;
/// it is the caller's to ready, and then to give the slot back with
/// [`netpollfinish`] (until then the slot says `PD_WAKING`, and neither
/// the G nor its scheduler can go away: see "Wakers and teardown" in
/// `netpollblock`).
fn netpollunblock(pd: &PollDesc, mode: u8, ioready: bool) -> *mut G {
    let gpp = pd.slot(mode);
    let mut old = gpp.load(Ordering::SeqCst);
    loop {
        let new = match old {
            PD_READY | PD_WAKING_READY => return null_mut(),
            PD_NIL if !ioready => return null_mut(),
            // Another waker is readying the G: nothing more to do for a
            // close or a deadline; readiness is kept for the next wait.
            PD_WAKING if !ioready => return null_mut(),
            PD_WAKING => PD_WAKING_READY,
            PD_NIL | PD_WAIT if ioready => PD_READY,
            PD_NIL | PD_WAIT => PD_NIL,
            _ => PD_WAKING,
        };
        match gpp.compare_exchange_weak(old, new, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => break,
            Err(o) => old = o,
        }
    }
    if matches!(old, PD_NIL | PD_WAIT | PD_WAKING) {
        return null_mut();
    }
    // A G in a slot is parked (netpollblockcommit) and counted in its
    // scheduler's waiters; taking it out of the slot makes it ours, and
    // PD_WAKING keeps it and its scheduler live until netpollfinish. It
    // stays counted until it is readied (netpollready_g).
    old as *mut G
}

/// Gives back a slot [`netpollunblock`] took a G out of, once the G is
/// readied and the waker is done with it and its scheduler: "ready" for
/// `ioready` or if readiness came meanwhile, else nothing.
fn netpollfinish(gpp: &AtomicUsize, ioready: bool) {
    let fin = if ioready { PD_READY } else { PD_NIL };
    if gpp
        .compare_exchange(PD_WAKING, fin, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // PD_WAKING_READY: only the taker changes it.
        gpp.store(PD_READY, Ordering::SeqCst);
    }
}

/// Readies `gp`, a G a waker took out of its slot (behind the run queue,
/// as Go's `netpollready` list is injected). On a thread that is not an M
/// of `gp`'s scheduler (a `close` on a plain thread or in another
/// runtime, another scheduler's poller), counted in the teardown's
/// barrier ([`crate::sema::ready_outside`]): else a wake-up that passed
/// `ready`'s `stopping` check just before the runtime's drop began could
/// queue `gp` after the teardown had resumed it.
///
/// # Safety
///
/// `gp` was taken out of its slot, which is `PD_WAKING` (so `gp` stays
/// parked and its scheduler live) until `netpollfinish`.
unsafe fn netpollready_g(gp: *mut G) {
    // SAFETY: the contract.
    unsafe {
        let sched = (*gp).rt;
        let inside = core::ptr::eq(crate::runtime2::current_sched(), sched);
        #[cfg(all(test, feature = "std"))]
        tests::before_ready(&*sched);
        if inside {
            crate::proc::ready::<false>(gp);
        } else {
            crate::sema::ready_outside::<false>(&*sched, gp);
        }
        // Uncounted only now that it is queued: counted, the wait was
        // what kept the deadlock check (`timesleepuntil`) from taking the
        // all-idle scheduler for deadlocked; queued, the run queue or its
        // M's inbox does. Uncounted when taken out of its slot (as
        // before), a waker that is not one of the scheduler's running Ms
        // (another scheduler's poller, a close on a plain thread) left a
        // window in which the check saw neither: a false `Err(Deadlock)`
        // while the socket was ready.
        (*sched).netpoll.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wakes the goroutine waiting on `pd` for `mode`, if one is, for a close
/// or a deadline.
fn netpollwake(pd: &PollDesc, mode: u8) {
    let gp = netpollunblock(pd, mode, false);
    if !gp.is_null() {
        // SAFETY: taken out of its slot: parked and ours, its scheduler
        // live until netpollfinish.
        unsafe { netpollready_g(gp) };
        netpollfinish(pd.slot(mode), false);
    }
}

/// Takes the slot `gpp` back for `gp`, the G that parked on it and is
/// running again (or, with `drop`, will never run again): waits while a
/// waker that took `gp` out is still readying it, then empties the slot
/// (with `drop`, only takes `gp` out if it is still there). Returns what
/// the slot held.
///
/// `gp` and its scheduler are live.
fn netpollsettle(gpp: &AtomicUsize, gp: *mut G, drop: bool) -> usize {
    let mut spins = 0u32;
    loop {
        let v = gpp.load(Ordering::SeqCst);
        if v == PD_WAKING || v == PD_WAKING_READY {
            // The waker is between its swap and netpollfinish: the rest of
            // `ready`, which never waits for this G's M. Rarely seen (the
            // G has to be running again first); hosted, the waker's thread
            // may have lost its CPU there, so after a while give it ours.
            crate::sema::backoff(&mut spins);
            continue;
        }
        if drop && v != gp as usize {
            return v;
        }
        if gpp
            .compare_exchange(v, PD_NIL, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            if v == gp as usize {
                // Taken out by us, not by a waker: uncount it as a waker
                // would have (netpollready_g).
                // SAFETY: the caller's G, live, of a live scheduler.
                unsafe { (*(*gp).rt).netpoll.waiters.fetch_sub(1, Ordering::SeqCst) };
            }
            return v;
        }
    }
}

/// For `Drop for Sched`: `gp`, a G of the scheduler being dropped that
/// parked on a source and will never run again, is taken out of the
/// source's slot (waiting for a waker that took it out already to finish),
/// so that nothing reaches it once it is freed.
///
/// # Safety
///
/// `gp` is a parked G of a scheduler whose Ms have all exited.
pub(crate) unsafe fn netpollabandon(gp: *mut G) {
    // SAFETY: the contract: nobody else writes pollslot (its G is not
    // running); a slot lives in a PollDesc (never freed).
    unsafe {
        if let Some(slot) = (*gp).pollslot.as_ref() {
            netpollsettle(slot, gp, true);
            (*gp).pollslot = core::ptr::null();
        }
    }
}

/// `gopark`'s unlock function for `netpollblock` (Go's
/// `netpollblockcommit`): puts the parked G in the slot unless a wake-up
/// came first, and makes sure an M polls.
///
/// # Safety
///
/// On g0 of the M that parked `gp`; `arg` is the slot.
unsafe fn netpollblockcommit(gp: *mut G, arg: *mut ()) -> bool {
    // SAFETY: the contract: the slot lives in a PollDesc (never freed);
    // gp's scheduler outlives it.
    let (gpp, sched) = unsafe { (&*arg.cast::<AtomicUsize>(), &*(*gp).rt) };
    sched.netpoll.waiters.fetch_add(1, Ordering::SeqCst);
    if gpp
        .compare_exchange(PD_WAIT, gp as usize, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // Ready, closed or past the deadline already: do not park.
        sched.netpoll.waiters.fetch_sub(1, Ordering::SeqCst);
        return false;
    }
    // A waiter is a timer at +∞ for the timer sleeper (module docs).
    crate::time::wakenetpoller(sched, crate::time::MAX_WHEN);
    true
}

/// Parks the current goroutine until `pd` is ready for `mode`, is
/// closed, or `deadline` (a `nanotime` reading, 0 for none) has passed
/// (Go's `netpollblock`). True if it became ready.
///
/// # Safety
///
/// On a user G of `sched`, the only goroutine waiting on `pd` for `mode`;
/// the source is armed with `sched`'s poller.
unsafe fn netpollblock(sched: &Sched, pd: &'static PollDesc, mode: u8, deadline: u64) -> bool {
    let gpp = pd.slot(mode);
    loop {
        if gpp
            .compare_exchange(PD_READY, PD_NIL, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return true;
        }
        match gpp.compare_exchange(PD_NIL, PD_WAIT, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => break,
            Err(PD_READY) => continue,
            Err(_) => crate::panic::throw(
                "netpollblock: two goroutines wait on one source in one direction",
            ),
        }
    }
    let gp = crate::tls::getg();
    // Wakers and teardown: a waker that takes the G out of the slot
    // (readiness, a close from any thread, a deadline, another
    // scheduler's poller) leaves PD_WAKING there until it has readied
    // the G and is done with it and its scheduler. So the G leaves only
    // once the slot has settled (`netpollsettle`): also when a dropped
    // runtime unwinds it out of `gopark` (Settle below), which otherwise
    // could free the G and the scheduler under the waker. A G that is
    // never resumed is taken out of the slot by `Drop for Sched`
    // (`netpollabandon`), through `pollslot`.
    // SAFETY: the contract: the running user G writes its own field.
    unsafe { (*gp).pollslot = gpp };
    /// Settles the slot if the wait ends by unwinding (a runtime dropped
    /// while we wait unwinds out of gopark: the slot must not keep the G).
    struct Settle<'a>(&'a AtomicUsize, *mut G);
    impl Drop for Settle<'_> {
        fn drop(&mut self) {
            netpollsettle(self.0, self.1, false);
            // SAFETY: the running G's own field.
            unsafe { (*self.1).pollslot = core::ptr::null() };
        }
    }
    let settle = Settle(gpp, gp);
    if deadline != 0 {
        deadline_arm(sched, pd, mode, deadline);
    }
    // The reasons not to wait, after PD_WAIT is published (module docs).
    if !pd.closing() && (deadline == 0 || sched.platform.nanotime() < deadline) {
        // SAFETY: the contract: a user G; the slot outlives the park.
        unsafe {
            crate::proc::gopark(
                netpollblockcommit,
                (gpp as *const AtomicUsize).cast_mut().cast(),
                crate::runtime2::WaitReason::IoWait,
            )
        };
    }
    core::mem::forget(settle);
    let old = netpollsettle(gpp, gp, false);
    // SAFETY: as above.
    unsafe { (*gp).pollslot = core::ptr::null() };
    if deadline != 0 {
        pd.deadlines[usize::from(mode == MODE_W)].lock().when = 0;
    }
    old == PD_READY
}

/// Arranges for the wait on `pd`'s `mode` to end at `deadline`: a timer,
/// unless one already fires by then (one timer per direction at a time;
/// timers cannot be stopped, so a stale one fires and finds nothing to do,
/// or re-arms for the wait under way).
fn deadline_arm(sched: &Sched, pd: &'static PollDesc, mode: u8, deadline: u64) {
    let add = {
        let mut d = pd.deadlines[usize::from(mode == MODE_W)].lock();
        d.when = deadline;
        if d.timer == 0 || d.timer > deadline {
            d.timer = deadline;
            true
        } else {
            false
        }
    };
    if add {
        deadline_timer(sched, pd, mode, deadline);
    }
}

/// Adds the timer of a deadline at `w`.
fn deadline_timer(sched: &Sched, pd: &'static PollDesc, mode: u8, w: u64) {
    let seq = pd.seq.load(Ordering::Relaxed);
    crate::time::addtimer(
        sched,
        w,
        crate::time::TimerFn::Call(Box::new(move || deadline_fire(pd, mode, seq, w))),
    );
}

/// A deadline timer set for `w` fired (on g0 of an M holding a P): ends
/// the wait if its deadline has passed, or re-arms for a later one.
fn deadline_fire(pd: &'static PollDesc, mode: u8, seq: u32, w: u64) {
    if pd.seq.load(Ordering::Acquire) != seq {
        return;
    }
    // SAFETY: timers run on g0 of an M of the scheduler that added them.
    let sched = unsafe { &*(*(*crate::tls::getg()).m).rt };
    let now = sched.platform.nanotime();
    let (expired, rearm) = {
        let mut d = pd.deadlines[usize::from(mode == MODE_W)].lock();
        if d.timer == w {
            d.timer = 0;
        }
        let expired = d.when != 0 && d.when <= now;
        let rearm = !expired && d.when != 0 && d.timer == 0;
        if rearm {
            d.timer = d.when;
        }
        (expired, rearm.then_some(d.when))
    };
    if expired {
        // The goroutine reads the clock after PD_WAIT: it sees the
        // deadline passed, or this finds it (module docs).
        netpollwake(pd, mode);
    }
    if let Some(when) = rearm {
        deadline_timer(sched, pd, mode, when);
    }
}

/// Go's "poll network" in `findRunnable`, before stealing: if goroutines
/// wait and no M blocks in the poller, polls without blocking and readies
/// what it finds. True if it readied any.
///
/// On g0 of an M of `sched` holding a P.
#[inline]
pub(crate) fn findrunnable_netpoll(sched: &Sched) -> bool {
    if sched.netpoll.waiters.load(Ordering::Relaxed) <= 0 || crate::time::netpoll_blocked(sched) {
        return false;
    }
    let Some(poller) = netpollinited(sched) else {
        return false;
    };
    let mut list = ReadyList::new();
    poller.netpoll(0, &mut list);
    let any = !list.is_empty();
    // SAFETY: the Gs came out of their slots.
    unsafe { list.readyall() };
    any
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use core::cell::Cell;
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use crate::runtime2::Sched;

    std::thread_local! {
        /// Set on the thread whose next poller wake-up runs a deadlock
        /// check before it readies its goroutine.
        static CHECK: Cell<bool> = const { Cell::new(false) };
    }

    /// The check ran.
    static CHECKED: AtomicBool = AtomicBool::new(false);

    /// Called by `netpollready_g` with the G out of its slot, not yet
    /// readied: on a thread with `CHECK`, runs the scheduler's deadlock
    /// check there, as one of its Ms going idle may (every P is idle).
    pub(super) fn before_ready(sched: &Sched) {
        if !CHECK.with(|c| c.replace(false)) {
            return;
        }
        while sched.npidle.load(Ordering::SeqCst) as usize != sched.allp.len() {
            std::thread::yield_now();
        }
        crate::proc::checkdead(sched);
        CHECKED.store(true, Ordering::SeqCst);
    }

    #[test]
    fn a_goroutine_woken_from_its_socket_by_another_thread_is_never_reported_as_a_deadlock() {
        let rt = std::sync::Arc::new(crate::Runtime::builder().procs(1).build().unwrap());
        let l = crate::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = crate::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let other = s.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let rt2 = rt.clone();
        std::thread::spawn(move || {
            let r = rt2.block_on(move || (&s).read(&mut [0; 1]).map(drop));
            tx.send(r.map(|r| r.map_err(|e| e.kind()))).unwrap();
        });
        while rt.stats().goroutines.waiting < 1 {
            std::thread::yield_now();
        }
        // The close takes the reader out of its slot and, before readying
        // it, runs the check: the reader must still count as waiting (it
        // was uncounted there, and every P idle read as a deadlock).
        std::thread::spawn(move || {
            CHECK.with(|c| c.set(true));
            other.close();
        })
        .join()
        .unwrap();
        assert!(
            CHECKED.load(Ordering::SeqCst),
            "the close woke no goroutine"
        );
        let r = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("block_on still waiting after 60 s");
        assert_eq!(r.ok(), Some(Err(std::io::ErrorKind::NotConnected)));
        drop(c);
    }
}
