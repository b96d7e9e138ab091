//! The scheduler (Go's `proc.go`).
//!
//! # G, M, P
//!
//! A **G** is a goroutine: a stack, a saved context and a function. An
//! **M** is a worker thread; it runs Gs on their stacks and its own
//! scheduling code on its **g0** stack. A **P** is the right to run user
//! code: there are `procs` of them, and an M must hold one to run a G. Each
//! P has a local run queue (a ring of 256 plus `runnext`) and a free list
//! of dead Gs whose stacks can be reused; a global run queue and a global
//! free list back them up.
//!
//! `newproc` makes a G (reusing a dead one when it can) and puts it in the
//! creating P's `runnext`. `schedule` (on g0) picks the next G: every 61st
//! time the global queue first, then `runnext`, the ring, the global queue,
//! and finally half of another P's ring, stolen. `execute` switches to it.
//! A G leaves the CPU through `mcall`: `goexit0` when it returns,
//! `gosched_m` when it yields, `park_m` when it waits; `ready` makes a
//! waiting G runnable again.
//!
//! # Spinning Ms and wake-ups
//!
//! An M with nothing to run gives its P back and sleeps (`stopm`), and
//! must be woken when work appears — without waking Ms for nothing, and
//! without ever leaving work behind with an idle P and no M looking. Go's
//! protocol, kept here:
//!
//! - An M that is looking for work without having found it is
//!   *spinning* (counted in `nmspinning`). Whoever makes a G runnable
//!   (`newproc`, `ready`) calls `wakep`, which starts a spinning M only if
//!   there is an idle P and no M is spinning already.
//! - A spinning M that finds work stops spinning and calls `wakep` again,
//!   so another M takes over the search (`resetspinning`).
//! - A spinning M that finds nothing releases its P, decrements
//!   `nmspinning`, and then checks every run queue (and the global queue)
//!   once more before sleeping. The producer publishes its G and then reads
//!   `nmspinning`; the M decrements `nmspinning` and then reads the queues;
//!   both with sequentially consistent operations, so at least one of them
//!   sees the other: either the producer sees no spinning M and wakes one,
//!   or the M sees the G.
//!
//! Hosted there is no asynchronous preemption (bare metal, see
//! [`crate::preempt`]): a G runs until it yields, parks or exits. A G that
//! runs `runnext` (so does the G it wakes, and so on) inherits its time
//! slice; sysmon ([`crate::sysmon`]) watches each P's `schedtick` and,
//! when one slice has lasted 10 ms, sets the P's `preempt` flag, which
//! the next `schedule` on that P reads (one relaxed load) to put the
//! chain behind the queues. A scheduler that no sysmon watches still ends
//! a chain after [`RUNNEXT_LIMIT`] hand-offs. The same monitor retakes the
//! P of a G in a blocking call ([`crate::syscall`]), wakes an M for
//! overdue timers, and reports a G that holds its P long without a
//! scheduling point; its docs say why hosted Gs are not interrupted.
//!
//! Timers (see [`time`](crate::time)) are work too: `findrunnable` runs
//! expired ones, and an M with nothing to do while timers are pending
//! sleeps until the next deadline instead of for good.
//!
//! So are interrupt handlers' posts ([`crate::intr`]): the same argument
//! with the injection list as the queue, and a lock-free kick of an idle
//! M instead of `startm`; and, when CPUs join instead of threads being
//! started ([`crate::cpu`]), a `startm` that finds no idle M leaves its
//! work to the next M that goes idle (`wantm`). Both arguments are
//! written out in those modules.
//!
//! So are goroutines waiting on the network poller (see
//! [`netpoll`](crate::netpoll)): `findrunnable` polls without blocking
//! before it steals, and the M that sleeps for the timers blocks in the
//! poller instead; a waiter counts as a timer that never fires, so the
//! timers' no-lost-wake-up argument covers it unchanged (written down in
//! `netpoll`).
//!
//! # Where goroutines run
//!
//! Go moves a goroutine to whichever M is free: a yield goes to the
//! global queue, a wake-up to the waker's P, and idle Ms steal. Rust code
//! cannot be moved that way. LLVM treats the thread pointer as fixed
//! within a function, so it computes a `thread_local!`'s address once and
//! keeps it across calls: after a switch that resumed the goroutine on
//! another thread, the function uses the old thread's copy (seen: glibc's
//! "double free or corruption" from a `Cell<Option<Box<_>>>`, `RefCell`s
//! borrowed twice, std's per-thread panic count off by one on two
//! threads). No care in user code avoids it, since the source holds no
//! reference across the switch. So, by default:
//!
//! - **The invariant.** A G that has started runs only on the M it first
//!   ran on (`G::boundm`, set by `execute` on the first run and cleared by
//!   `goexit0`). A G that has not started yet may run anywhere: its
//!   closure is `Send` and no frame of it exists.
//! - **Where it is enforced.** Bound Gs never go on a P's run queue or the
//!   global queue, so no steal and no other M's `findrunnable` can find
//!   them; `execute` throws if handed one bound elsewhere. A bound G made
//!   runnable goes to its own M's queue: `gosched_m` and a `ready` on that
//!   M's thread put it in `boundnext` / `boundq` (owner-only, no lock, no
//!   atomic); a `ready` on any other thread puts it in the M's `inbox`
//!   (see [`crate::bound`]). `findrunnable` takes the M's own Gs and the
//!   P's queue by turns.
//! - **How it gets back to its thread.** Its M runs it at its next
//!   scheduling point if it holds a P. If the M sleeps, the waker wakes it
//!   with an idle P, or — every P busy — puts it on `mwantp`, the list of
//!   Ms waiting for a P: the next P to go idle goes to it (`pidleput`), and
//!   an M holding a P gives it up at its next scheduling point
//!   (`bound::handoff_wanted`: at once if it has no bound G of its own
//!   waiting, after a 1 ms slice otherwise).
//! - **Why no wake-up is lost.** The waker publishes the G and then reads
//!   the M's `sleeping`; the M sets `sleeping` and then looks at its inbox
//!   before it sleeps, all sequentially consistent, and both act under
//!   `Sched::lock` on what they saw: one of them sees the other (the full
//!   argument is in [`crate::bound`]). An M that found work elsewhere is
//!   awake and reaches its inbox at its next scheduling point. `checkdead`
//!   counts an M on its way to sleep with its inbox non-empty as work.
//! - **What balances the load.** New Gs: `newproc` puts them in the P's
//!   `runnext`, and idle Ms steal them as in Go. A goroutine that started
//!   on a busy M stays there; two goroutines that talk to each other
//!   usually share a thread, which makes their hand-offs cheap.
//! - **The opt-in.** [`Sched::with_migration`] (hosted:
//!   `Builder::migrate_started_goroutines`, both `unsafe`) leaves
//!   `boundm` null except while a G is locked: Go's behaviour, with a
//!   promise from the program that nothing it runs depends on its thread
//!   across a scheduling point. The freestanding [`Sched::new`] binds by
//!   default too: a kernel's per-CPU data is the same hazard as a
//!   thread-local, and the `unsafe` `Platform` contract cannot make LLVM
//!   reload a per-CPU address.
//!
//! # Locked Gs (LockOSThread)
//!
//! [`lock_os_thread`] wires a G to its M (bound already, or bound now when
//! the scheduler migrates) and makes the M run nothing else. A locked G
//! made runnable goes on no queue at all: its status says it. When it
//! parks or yields, its M's `schedule` goes to `stoplockedm`, which hands
//! the P off (`handoffp`: to an M at once if there is work, else to the
//! idle list, after which it looks at the other queues and the timers as
//! an M idling its P in `findrunnable` does) and sleeps until the G is
//! runnable and a P is free (an idle one, or one handed to it on
//! `mwantp`). A locked M asleep holds no P, so it counts as idle for
//! `checkdead`; `Sched::shutdown` wakes it to exit. A G that exits locked
//! leaves its M unlocked, back in the pool (Go ends the thread; see
//! [`lock_os_thread`]).
//!
//! Other Gs bound to a locked M (started there before the lock) cannot
//! move: they wait, runnable, until the lock is released or the locked G
//! exits. [`Sched::go_locked`] (hosted: `spawn_locked`;
//! `bound::newproc_locked`) starts a G locked on an M with no bound Gs — an idle one or a new one — which is
//! what a goroutine that changes its thread's state should use.
//!
//! # Introspection
//!
//! [`Sched::stats`] takes a [`Stats`] snapshot (Gs by status from `allgs`,
//! queue lengths, Ms and Ps, the per-P [`PStats`] counters) and
//! [`schedtrace`] turns one into a line of Go's `GODEBUG=schedtrace`
//! format. The scheduling paths keep no counters for it beyond the per-P
//! ones the owner bumps.
//!
//! # Who calls what
//!
//! Functions ending in `_m` run on g0 through `mcall`. `schedule`,
//! `findrunnable`, `execute`, `stopm`, `stoplockedm` run on g0. An M's
//! own queue (`boundnext`, `boundq`) is for that M's thread only. The run-queue functions on
//! a P (`runqput`, `runqget`) are for the M holding that P; `runqsteal`
//! takes from any P. Functions taking `&mut SchedLocked` run under
//! `Sched::lock`.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::panic::Location;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicU32, AtomicU64, Ordering, fence};

use memoffset::offset_of;

use crate::asm_amd64::{goexit, gogo, gostart, mcall, mstart1};
use crate::bound::{gqueue_pop, gqueue_push};
use crate::lock_futex::{Note, noteclear, notesleep, notewakeup};
use crate::panic::{throw, throw_g};
pub use crate::park::Parker;
use crate::runq::{RUNQ_LEN, runqdemote, runqempty, runqget, runqput, runqs_queued, runqsteal};
use crate::runtime2::{
    FuncVal, G, GQueue, Gobuf, M, P, PCounters, RUNNEXT_LIMIT, Sched, SchedLocked, Stack, StartFn,
    WaitReason, status,
};
use crate::stack::{StackError, stackalloc};
use crate::stubs::OnceFrame;
use crate::tls::{getg, setg};

/// The source of goroutine ids (Go's `sched.goidgen`). Ids start at 1;
/// 0 is every g0's.
static GOIDGEN: AtomicU64 = AtomicU64::new(0);

/// A fresh goroutine id.
pub fn newgoid() -> u64 {
    // Relaxed: ids only need to be unique.
    GOIDGEN.fetch_add(1, Ordering::Relaxed) + 1
}

/// A fresh goroutine id from P `pp`'s cache, refilled
/// [`GOIDCACHE_BATCH`](crate::runtime2::GOIDCACHE_BATCH) at a time (Go's
/// `goidcache` in `newproc1`); [`newgoid`] without a P.
///
/// # Safety
///
/// `pp` is null or the caller's P.
unsafe fn pgoid(pp: *mut P) -> u64 {
    if pp.is_null() {
        return newgoid();
    }
    // SAFETY: the contract: the P's owner-only fields are ours.
    unsafe {
        if (*pp).goidcache == (*pp).goidcacheend {
            let batch = crate::runtime2::GOIDCACHE_BATCH;
            // Relaxed: ids only need to be unique.
            let first = GOIDGEN.fetch_add(batch, Ordering::Relaxed) + 1;
            (*pp).goidcache = first;
            (*pp).goidcacheend = first + batch;
        }
        let id = (*pp).goidcache;
        (*pp).goidcache += 1;
        id
    }
}

/// A G with the given stack and nothing to run.
pub(crate) fn newg_struct(stack: Stack, stackmem: Option<crate::stack::StackMem>) -> G {
    G {
        stack,
        sched: Gobuf::new(),
        m: null_mut(),
        goid: AtomicU64::new(0),
        atomicstatus: AtomicU32::new(status::IDLE),
        startfv: FuncVal { fn_: gentry },
        startfn: StartFn::empty(),
        stackmem,
        schedlink: null_mut(),
        rt: core::ptr::null(),
        parker: None,
        allg_index: 0,
        waiting: core::ptr::null(),
        pollslot: core::ptr::null(),
        lockedm: null_mut(),
        boundm: null_mut(),
        force: crate::teardown::FORCE_NONE,
        waitreason: AtomicU8::new(WaitReason::Zero as u8),
        waitsince: AtomicU64::new(0),
        spawn_site: AtomicPtr::new(null_mut()),
        preempt: Default::default(),
    }
}

impl M {
    /// A new M with id `id` and a g0 that will run on the stack of the
    /// thread that calls [`mstart`] with it.
    pub fn new(id: i64) -> Box<M> {
        let g0 = Box::into_raw(Box::new(newg_struct(Stack::default(), None)));
        Box::new(M {
            g0,
            curg: null_mut(),
            gsignal: null_mut(),
            p: null_mut(),
            id,
            rt: core::ptr::null(),
            nextp: null_mut(),
            spinning: false,
            park: Note::new(),
            schedlink: null_mut(),
            fastrand: 0x9e37_79b9_7f4a_7c15 ^ (id as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
            waitunlockf: None,
            waitlock: null_mut(),
            lockedg: null_mut(),
            lockedext: 0,
            lockedsleep: false,
            boundnext: null_mut(),
            boundq: GQueue::new(),
            inbox: spin::Mutex::new(GQueue::new()),
            ninbox: AtomicU32::new(0),
            sleeping: AtomicU32::new(crate::bound::AWAKE),
            onmidle: false,
            bindg: true,
            handoffwork: false,
            nbound: AtomicU32::new(0),
            pwhen: 0,
            tornup: false,
            oldp: null_mut(),
            insyscall: core::sync::atomic::AtomicBool::new(false),
            procid: core::sync::atomic::AtomicI32::new(0),
            trace: crate::trace::MTrace::new(),
        })
    }
}

impl Drop for M {
    fn drop(&mut self) {
        // SAFETY: g0 was made by Box::into_raw in M::new and only this M
        // owns it; an M is dropped only when it no longer runs.
        drop(unsafe { Box::from_raw(self.g0) });
    }
}

/// Allocates a G with a stack of `stack_size` usable bytes (Go's `malg`).
///
/// The G is idle, has goid 0 and `sched.g` pointing at itself; dropping
/// it frees its stack. `stack_size` must pass
/// [`check_stack_size`](crate::stack::check_stack_size).
///
/// # Errors
///
/// [`StackError`] if the size is out of bounds or the stack cannot be
/// allocated.
pub fn malg(stack_size: usize) -> Result<Box<G>, StackError> {
    Ok(malg_with(stackalloc(stack_size)?))
}

fn malg_with(mem: crate::stack::StackMem) -> Box<G> {
    let mut gp = Box::new(newg_struct(mem.bounds(), Some(mem)));
    gp.sched.g = &raw mut *gp;
    gp
}

/// Prepares `gp` to run `f` the next time something does
/// `gogo(&gp.sched)` (Go's `gostartcallfn`): the stack is set up as if
/// [`goexit`] had called the entry trampoline [`gostart`], so when `f`
/// returns the G exits through `goexit1`. The G becomes runnable.
///
/// # Safety
///
/// `gp` must be a live G that is not running and not being resumed by
/// anyone, whose stack (`gp.stack`) is allocated and not in use.
pub unsafe fn gostartcallfn<F: FnOnce() + Send + 'static>(gp: *mut G, f: F) {
    // SAFETY: per the contract, nothing else touches gp or its stack.
    let g = unsafe { &*gp };
    if g.stack.hi == 0 || g.stack.hi - g.stack.lo < 64 {
        throw_g("gostartcallfn on a goroutine with no stack", gp);
    }
    // SAFETY: the contract, and the stack was just checked.
    unsafe { gostartcall(gp, f) }
}

/// [`gostartcallfn`] for a G known to have a stack (one made by `malg`,
/// as the scheduler's are).
///
/// # Safety
///
/// As [`gostartcallfn`], and `gp.stack` is at least 64 bytes.
#[inline(always)]
pub(crate) unsafe fn gostartcall<F: FnOnce() + Send + 'static>(gp: *mut G, f: F) {
    // SAFETY: the contract.
    unsafe {
        gostartfn(gp, f);
        gostartframe(gp);
        (*gp)
            .atomicstatus
            .store(status::RUNNABLE, Ordering::Release);
    }
}

/// The stack-independent half of [`gostartcall`]: stores `f` and points
/// `sched.ctxt` at it.
///
/// # Safety
///
/// `gp` is a live G that nothing else touches.
#[inline(always)]
pub(crate) unsafe fn gostartfn<F: FnOnce() + Send + 'static>(gp: *mut G, f: F) {
    // SAFETY: per the contract, nothing else touches gp.
    let g = unsafe { &mut *gp };
    g.startfv = FuncVal { fn_: gentry };
    g.startfn.set(f);
    // Only what `gogo` and the entry trampoline read: a fresh G has no
    // callee-saved registers to restore (gostart calls into Rust, which
    // saves what it uses), and bp 0 ends frame-pointer walks.
    g.sched.g = gp;
    g.sched.ctxt = &raw mut g.startfv as usize;
    g.sched.bp = 0;
}

/// The other half: the first frame on the G's stack, as if [`goexit`]
/// had called [`gostart`].
///
/// # Safety
///
/// `gp` is a live G that nothing else touches, whose stack is at least 64
/// bytes and unused.
#[inline(always)]
pub(crate) unsafe fn gostartframe(gp: *mut G) {
    // SAFETY: per the contract, nothing else touches gp or its stack.
    let g = unsafe { &mut *gp };
    let sp = (g.stack.hi & !15) - 8;
    // SAFETY: sp lies inside the G's own, unused stack.
    unsafe { (sp as *mut usize).write(goexit as *const () as usize + 1) };
    g.sched.sp = sp;
    g.sched.pc = gostart as *const () as usize;
}

/// The function every fresh G runs first (through `G.startfv`): takes the
/// G's closure and calls it.
///
/// # Safety
///
/// `fv` must be the `startfv` field of a live G; only [`gostart`] calls it.
unsafe extern "C" fn gentry(fv: *mut FuncVal) {
    let gp = fv.wrapping_byte_sub(offset_of!(G, startfv)).cast::<G>();
    crate::panic::run_catching(gp);
}

/// Finishes the current G: called by [`goexit`] when a G's function
/// returns (Go's `goexit1`). Switches to g0 to run [`goexit0`].
pub(crate) extern "C" fn goexit1() -> ! {
    // SAFETY: we are on a user G (goexit is only reached from a fresh G's
    // function); goexit0 does not return.
    unsafe { mcall(goexit0) };
    throw_g("goexit: resumed a dead goroutine", getg())
}

/// Checks the soft guard below `gp`'s stack as it switches out (stacks
/// without a guard page: freestanding, and hosted arena stacks); a G that
/// ran off its stack is a fatal error naming it.
pub(crate) fn stackcheck(gp: *mut G) {
    // SAFETY: gp is the G that just switched out: live, its stack too.
    if let Some(mem) = unsafe { &(*gp).stackmem }
        && mem.has_soft_guard()
        && !crate::stack::stackguard_ok(mem)
    {
        crate::panic::stackoverflow(gp, 0);
    }
}

/// Detaches the G that just switched away from its M (Go's `dropg`).
///
/// # Safety
///
/// On g0, with `gp` the G that was `m.curg`.
pub(crate) unsafe fn dropg(gp: *mut G) -> *mut M {
    // SAFETY: the contract: gp is suspended and was this M's curg.
    unsafe {
        let mp = (*gp).m;
        (*mp).curg = null_mut();
        (*gp).m = null_mut();
        mp
    }
}

/// On g0: the G `gp` has finished (Go's `goexit0`). It becomes dead and,
/// under a scheduler, goes on its P's free list with its stack; then the M
/// looks for the next G.
///
/// # Safety
///
/// Only [`mcall`] calls it, with the G that just finished.
unsafe extern "C" fn goexit0(gp: *mut G) {
    stackcheck(gp);
    // SAFETY: gp was running on this M and is now suspended for good; only
    // this M touches it until it is reused.
    unsafe {
        (*gp).casstatus(status::RUNNING, status::DEAD);
        (*gp).startfn.clear();
        (*gp).parker = None;
        crate::trace::gostop((*gp).m, gp, crate::trace::EventKind::GoEnd);
        if !(*gp).lockedm.is_null() {
            // Exiting locked: the M is unlocked and goes back to the pool
            // (see lock_os_thread: Go ends the thread).
            dounlockosthread(gp, (*gp).m);
        }
        if !(*gp).boundm.is_null() {
            // On this M: a load and a store (see M::nbound_add).
            (*(*gp).boundm).nbound_add(-1);
            (*gp).boundm = null_mut();
        }
        let mp = dropg(gp);
        let pp = (*mp).p;
        if !(*mp).rt.is_null() && !pp.is_null() {
            let sched = &*(*mp).rt;
            // Release: the G's work happens before anyone sees the count drop.
            sched.ngoroutines.fetch_sub(1, Ordering::Release);
            gfput(sched, pp, gp);
        }
    }
    schedule()
}

// ---------------------------------------------------------------------
// Starting Ms.

/// Runs the calling thread as M `mp`: makes `mp.g0` the current G, records
/// `g0.sched` (once, in [`mstart1`]) and calls `f` on g0.
///
/// Returns when `f` returns, or when code on this M ends it with
/// `gogo(&g0.sched)` (as the scheduler does when there is nothing left to
/// run); in the second case `f`'s frames are abandoned without running
/// destructors. Afterwards the thread is no longer an M.
///
/// # Safety
///
/// `mp` must be a live M that no thread is running, and must outlive this
/// call. `f` and the Gs it runs must follow the switch contracts in
/// [`asm_amd64`](crate::asm_amd64).
///
/// Calling it on a thread that already runs an M is a fatal error.
pub unsafe fn mstart<F: FnOnce()>(mp: *mut M, f: F) {
    let cur = getg();
    if !cur.is_null() {
        throw_g("mstart on a thread that is already running an M", cur);
    }
    // SAFETY: mp is live and not running (the contract).
    let g0 = unsafe { (*mp).g0 };
    // SAFETY: g0 belongs to mp, which nothing else runs.
    unsafe {
        (*g0).m = mp;
        (*g0).sched.g = g0;
        (*g0).atomicstatus.store(status::RUNNING, Ordering::Relaxed);
        setg(g0);
    }
    // Hosted: a G's stack overflow is caught on this thread's alternate
    // signal stack (removed again when the M ends, if we added it).
    #[cfg(feature = "std")]
    let _altstack = {
        crate::signal_unix::initsig();
        crate::signal_unix::minitsignals()
    };
    let mut frame = OnceFrame::new(f);
    // SAFETY: g0 is this thread's current G and `frame` lives until
    // mstart1 returns.
    unsafe { mstart1(&raw mut (*g0).sched, frame.funcval()) };
    // The M has ended. This thread is g0's again (gogo(&g0.sched) or a
    // plain return both leave it so).
    // SAFETY: as above; g0.sched now points into a dead frame: clear it.
    unsafe {
        (*g0).sched = Gobuf::new();
        (*g0).atomicstatus.store(status::IDLE, Ordering::Relaxed);
        (*mp).curg = null_mut();
        setg(null_mut());
    }
}

/// The body of every scheduler M's thread (Go's `mstart0`): run as `mp`,
/// take the P `startm` gave it, and schedule until the scheduler stops.
///
/// # Safety
///
/// Only a [`Platform::newosproc`](crate::platform::Platform::newosproc)
/// thread calls it, once, for an M made by `newm` (which holds a reference
/// on the scheduler for it).
pub unsafe fn mstart0(mp: *mut M) {
    // Hosted: the thread id, for the stall detector's signal (sysmon).
    #[cfg(feature = "std")]
    // SAFETY: gettid takes no arguments and cannot fail; mp is live.
    unsafe {
        (*mp)
            .procid
            .store(libc::syscall(libc::SYS_gettid) as i32, Ordering::Relaxed)
    };
    // SAFETY: mp is an M of a live scheduler; this thread now runs it.
    unsafe {
        mstart(mp, || {
            let pp = (*mp).nextp;
            (*mp).nextp = null_mut();
            if !pp.is_null() {
                acquirep(mp, pp);
            }
            schedule()
        });
        let sched = (*mp).rt;
        // Release: everything this M did happens before the runtime's
        // shutdown sees it gone.
        (*sched).nmlive.fetch_sub(1, Ordering::Release);
        (*sched).platform.futexwakeup(&(*sched).nmlive, 1);
        // The reference newm took for this thread.
        Arc::decrement_strong_count(sched);
    }
}

/// Makes a new M for `sched` that will start with P `pp` (Go's `newm`),
/// locked to `lockedg` unless that is null.
///
/// # Safety
///
/// `sched` must be inside an `Arc` (a reference is taken for the thread).
/// `pp` must be an idle P taken off the idle list, or null. `lockedg`, if
/// not null, is a new runnable G of `sched` on no queue.
pub(crate) unsafe fn newm(sched: &Sched, pp: *mut P, spinning: bool, lockedg: *mut G) {
    let mut m = M::new(sched.mnext.fetch_add(1, Ordering::Relaxed));
    m.rt = sched;
    m.nextp = pp;
    m.spinning = spinning;
    m.bindg = !sched.migrate;
    let mp = Box::into_raw(m);
    if !lockedg.is_null() {
        // SAFETY: a new M and a new G, nobody else's yet.
        unsafe { crate::bound::lockfresh(mp, lockedg) };
    }
    sched.allm.lock().push(mp);
    crate::cpu::mregister(sched, mp);
    sched.nmlive.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the contract: sched lives in an Arc; the thread gives this
    // reference back when it ends (mstart0).
    unsafe { Arc::increment_strong_count(sched) };
    // SAFETY: mp is the M just made for this thread; it lives in allm
    // until the scheduler is dropped, after the thread is done.
    if unsafe { sched.platform.newosproc(mp) }.is_err() {
        throw("newm: the platform could not start a thread for a new M");
    }
}

/// Runs some M on P `pp`, or on an idle P if `pp` is null (Go's `startm`):
/// wakes an idle M or makes a new one. With no idle P, does nothing (and
/// gives back the spinning count the caller took).
fn startm(sched: &Sched, pp: *mut P, spinning: bool) {
    let mut sl = sched.lock.lock();
    let pp = if pp.is_null() {
        pidleget(&mut sl, sched)
    } else {
        pp
    };
    if pp.is_null() {
        drop(sl);
        if spinning {
            // The caller incremented nmspinning for the M it wanted.
            sched.nmspinning.fetch_sub(1, Ordering::SeqCst);
        }
        return;
    }
    let nmp = mget(&mut sl);
    if nmp.is_null() && !sched.platform.starts_threads() {
        // CPUs joined and no thread can start: an M that is up finds it.
        crate::cpu::startm_nom(sl, sched, pp, spinning);
        return;
    }
    drop(sl);
    if nmp.is_null() {
        // SAFETY: schedulers live in an Arc (Runtime::build); pp is ours.
        unsafe { newm(sched, pp, spinning, null_mut()) };
        return;
    }
    // SAFETY: nmp came off the idle list: it sleeps in stopm and nothing
    // else touches these fields until notewakeup hands them over.
    unsafe {
        (*nmp).spinning = spinning;
        (*nmp).nextp = pp;
        notewakeup(sched.platform, &(*nmp).park);
    }
}

/// Whether [`wakep`] would start an M: an idle P and no spinning M. Its
/// first step, and a cheap check for callers that would have to hop to
/// g0 to call it.
#[inline]
fn wakep_needed(sched: &Sched) -> bool {
    // SeqCst fence: the G just published (a release store of a queue's
    // tail) is ordered before these loads, pairing with the spinning M's
    // SeqCst decrement of nmspinning followed by its re-check of the
    // queues (findrunnable): one of the two sides sees the other.
    fence(Ordering::SeqCst);
    sched.npidle.load(Ordering::SeqCst) != 0 && sched.nmspinning.load(Ordering::SeqCst) == 0
}

/// [`wakep_needed`] right after `runqput(.., next = true)` or a put on the
/// global queue, without the fence: `runqput`'s SeqCst swap of `runnext`
/// (one `xchg`, which it needs anyway), or `globrunqput`'s SeqCst store of
/// `runqsize` (an `xchg` too), does the fence's job. The argument (for
/// `runqsize` the same, with the spinner's re-read of `runqsize` after its
/// fence in place of `runqempty`): if the SeqCst load of
/// `nmspinning` below reads a value from before a spinning M's SeqCst
/// decrement, it precedes that decrement in the single SeqCst order, and
/// so does the swap, sequenced before it; the decrement is sequenced
/// before the spinner's SeqCst fence, so the spinner's later reads of
/// `runnext` (`runqempty`) see the swap or a later change (the owner
/// taking the G back to run it itself). Either we see the spinner gone
/// (and wake an M), or it sees the G. A G the swap displaced to the ring
/// may go unseen by the spinner, but its P is running (it just put work),
/// and runs it; it is not stranded.
#[inline]
fn wakep_needed_after_put(sched: &Sched) -> bool {
    sched.npidle.load(Ordering::SeqCst) != 0 && sched.nmspinning.load(Ordering::SeqCst) == 0
}

/// [`wakep`] right after a put that [`wakep_needed_after_put`] covers: no
/// fence.
fn wakep_after_put(sched: &Sched) {
    if wakep_needed_after_put(sched) {
        wakep_nmspinning(sched);
    }
}

/// Starts a spinning M if there is an idle P and no M is spinning (Go's
/// `wakep`). Called after making a G runnable.
pub(crate) fn wakep(sched: &Sched) {
    if wakep_needed(sched) {
        wakep_nmspinning(sched);
    }
}

/// [`wakep`] once an idle P and no spinning M were seen: becomes the
/// spinning M's starter if no one else did first.
fn wakep_nmspinning(sched: &Sched) {
    if sched
        .nmspinning
        .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return;
    }
    startm(sched, null_mut(), true);
}

/// Stops the current M until `startm` gives it a P (Go's `stopm`). Returns
/// false, without a P, when the scheduler is stopping. Work that waits
/// for an M (`crate::cpu`'s `wantm`, `crate::intr`'s posts) makes it take
/// an idle P as a spinning M instead, and a kick makes it look again.
///
/// # Safety
///
/// On g0 of `mp`, which holds no P.
pub(crate) unsafe fn stopm(sched: &Sched, mp: *mut M) -> bool {
    loop {
        let mut sl = sched.lock.lock();
        // Checked under the lock that shutdown takes after setting it, so
        // an M either sees it here or is on a list to be woken.
        if sched.stopping.load(Ordering::SeqCst) {
            return false;
        }
        // SAFETY: mp is this thread's M.
        unsafe {
            // SeqCst store, then has_bound_work's SeqCst load of the inbox
            // count: the M's half of the wake-up argument in bound.rs
            // (and in cpu.rs and intr.rs, with stopm_work's loads).
            (*mp).sleeping.store(crate::bound::IDLE, Ordering::SeqCst);
            if crate::bound::has_bound_work(mp) {
                // Gs of this M's own are runnable: only this M can run
                // them, so it waits for a P instead of for work.
                if crate::bound::takep_or_wait(&mut sl, sched, mp) {
                    return true;
                }
            } else if crate::cpu::stopm_work(&mut sl, sched, mp) {
                return true;
            } else {
                mput(&mut sl, mp);
            }
        }
        drop(sl);
        // SAFETY: mp is this thread's M; the note is its own.
        unsafe {
            notesleep(sched.platform, &(*mp).park);
            if !crate::cpu::stopm_kicked(sched, mp) {
                break;
            }
        }
    }
    // SAFETY: mp is this thread's M; the note is its own.
    unsafe {
        noteclear(&(*mp).park);
        (*mp).sleeping.store(crate::bound::AWAKE, Ordering::Relaxed);
        let pp = (*mp).nextp;
        (*mp).nextp = null_mut();
        if pp.is_null() {
            return false;
        }
        acquirep(mp, pp);
    }
    true
}

// ---------------------------------------------------------------------
// LockOSThread: a G wired to its M.
//
// A locked G runs only on its M (`g.lockedm`), and that M runs only it
// (`m.lockedg`). While the G cannot run (parked, or yielded) its M gives
// its P to another M (`handoffp`) and sleeps on its note (`stoplockedm`).
// Whoever makes the G runnable sets its status and then, if the M sleeps,
// gives it a P (bound::readylocked → wakehome). A yield or a park of a
// locked G thus costs an M wake-up where an unlocked one costs none.
//
// No lost or double wake-up of a locked M: its note has two wakers,
// `wakehome` (directly, or through `mwantp` when a P frees up) and
// `Sched::shutdown`, and all act under `Sched::lock`, as does the M's own
// decision to sleep.
//
// - The M, under the lock: `stopping` → exit (returning a P handed to it
//   to the idle list); a P handed to it (`nextp`) → run the G; else it
//   stores `sleeping = LOCKED` and reads the G's status (both SeqCst): if
//   runnable, it takes an idle P or goes on `mwantp`; if not, it marks
//   itself `lockedsleep`. Then it sleeps on its note.
// - The waker, after its SeqCst status change and fence, reads
//   `sleeping`; if set, under the lock: an M marked `lockedsleep` is
//   unmarked and given an idle P (woken) or put on `mwantp` (woken by
//   whoever hands it a P). One of the two sees the other's write, so the
//   runnable G is never left with its M asleep and unmarked.
// - `shutdown`, under the lock and after setting `stopping`: wakes the Ms
//   on `mwantp` and those marked `lockedsleep`, with `nextp` null: exit.
//
// Each sleep ends with exactly one wake-up: the mark and the place on
// `mwantp` are each taken away by the one that wakes the M.

/// Wires the calling goroutine to its M (hosted: its OS thread) until the
/// matching [`unlock_os_thread`] (Go's `LockOSThread`): from then on the
/// goroutine runs only on this M, and the M runs no other goroutine. Calls
/// nest, as Go's do: each needs its own unlock.
///
/// While the goroutine is parked or has yielded, its M sleeps and the M's
/// P runs other goroutines elsewhere; resuming it costs an M wake-up (its
/// waker, or the next M to free a P, hands this M a P).
///
/// Goroutines that started on this M before the lock (they stay on the M
/// they started on, unless the scheduler migrates) wait, runnable, until
/// the last unlock or the goroutine's exit. A goroutine that should have
/// its thread to itself is best started with [`Sched::go_locked`]
/// (hosted: `spawn_locked`).
///
/// A goroutine that exits while locked unlocks its M, which goes back to
/// the pool and runs other goroutines. (Go ends the thread instead, so
/// that thread state the goroutine changed dies with it; here an M may be
/// a CPU of a kernel, which cannot end. A goroutine that changes its
/// thread's state must restore it before it unlocks or exits.)
///
/// # Panics
///
/// Outside a goroutine of a scheduler, and when the nesting count would
/// overflow a `u32` (Go's "LockOSThread nesting overflow").
///
/// # Example
///
/// ```
/// use gokernel::Runtime;
///
/// fn tid() -> i64 {
///     // SAFETY: gettid takes no arguments and cannot fail.
///     unsafe { libc::syscall(libc::SYS_gettid) }
/// }
///
/// let rt = Runtime::builder().procs(2).build().unwrap();
/// rt.block_on(|| {
///     gokernel::proc::lock_os_thread();
///     let t = tid();
///     for _ in 0..100 {
///         gokernel::gosched(); // round-trips through another M
///         assert_eq!(tid(), t);
///     }
///     gokernel::proc::unlock_os_thread(); // may move from here on
/// })
/// .unwrap();
/// ```
pub fn lock_os_thread() {
    let gp = require_user_g("lock_os_thread");
    // SAFETY: on a user G of a scheduler M: the G cannot move to another M
    // during this call (there is no preemption), and only this M's own Gs
    // and g0 touch its lock fields.
    unsafe {
        let mp = (*gp).m;
        if crate::teardown::beside_locked(gp, mp) {
            return;
        }
        (*mp).lockedext = (*mp)
            .lockedext
            .checked_add(1)
            .expect("gokernel: lock_os_thread nesting overflow");
        dolockosthread(gp, mp);
    }
}

/// Undoes one [`lock_os_thread`] (Go's `UnlockOSThread`); the last one
/// lets the goroutine run on any M again, and its M run any goroutine.
/// Without a matching lock it does nothing, as in Go.
///
/// # Panics
///
/// Outside a goroutine of a scheduler.
///
/// # Example
///
/// ```
/// use gokernel::Runtime;
///
/// let rt = Runtime::builder().procs(1).build().unwrap();
/// rt.block_on(|| {
///     gokernel::proc::unlock_os_thread(); // not locked: nothing happens
///     gokernel::proc::lock_os_thread();
///     gokernel::proc::lock_os_thread();
///     gokernel::proc::unlock_os_thread(); // still locked: one lock left
///     gokernel::proc::unlock_os_thread(); // unlocked
/// })
/// .unwrap();
/// ```
pub fn unlock_os_thread() {
    let gp = require_user_g("unlock_os_thread");
    // SAFETY: as in lock_os_thread.
    unsafe {
        let mp = (*gp).m;
        if (*mp).lockedext == 0 || crate::teardown::beside_locked(gp, mp) {
            return;
        }
        (*mp).lockedext -= 1;
        if (*mp).lockedext == 0 {
            dounlockosthread(gp, mp);
        }
    }
}

/// Locks `gp` and `mp` to each other (Go's `dolockOSThread`).
///
/// # Safety
///
/// `gp` runs on `mp`, which belongs to a scheduler, and the caller is that
/// G; or both are new and nobody else's yet (`bound::lockfresh`).
pub(crate) unsafe fn dolockosthread(gp: *mut G, mp: *mut M) {
    // SAFETY: the contract: both are the caller's own.
    unsafe {
        if (*mp).lockedg.is_null() {
            // Relaxed: a statistic; nothing is ordered by it.
            (*(*mp).rt).nmlocked.fetch_add(1, Ordering::Relaxed);
        }
        (*mp).lockedg = gp;
        (*gp).lockedm = mp;
        // Migrating scheduler: bound while locked.
        crate::bound::bind_if_unbound(gp, mp);
    }
}

/// Unlocks `gp` and `mp` (Go's `dounlockOSThread`), and forgets the nesting
/// count.
///
/// # Safety
///
/// `gp` is locked to `mp` and runs on it (or has just exited on it), and
/// the caller is on `mp`.
unsafe fn dounlockosthread(gp: *mut G, mp: *mut M) {
    // SAFETY: the contract.
    unsafe {
        debug_assert!((*mp).lockedg == gp && (*gp).lockedm == mp);
        (*mp).lockedext = 0;
        (*mp).lockedg = null_mut();
        (*gp).lockedm = null_mut();
        if !(*mp).bindg && !crate::teardown::resumed(gp) {
            // Migrating scheduler: free to move again.
            (*gp).boundm = null_mut();
            // On this M: a load and a store (see M::nbound_add).
            (*mp).nbound_add(-1);
        }
        // Relaxed: a statistic.
        (*(*mp).rt).nmlocked.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Gives P `pp`, just released by an M that is going to sleep with its G
/// locked, to whoever should run it (Go's `handoffp`): an M started on it
/// at once if it or the global queue holds work, a spinning M if no M is
/// looking for work and no P is idle (so that other Ps' queues still get
/// stolen from), the idle list otherwise; then, as `findrunnable`'s M
/// does after idling its P, it looks once more at the other Ps' queues
/// and at the timers, and wakes an M for what it finds.
///
/// Returns true when that made every P idle with nothing queued: the
/// caller then runs `checkdead`, as `findrunnable` does when it idles the
/// last P.
pub(crate) fn handoffp(sched: &Sched, pp: *mut P) -> bool {
    // SAFETY: Ps live as long as the scheduler; only the (atomic) queue is
    // borrowed.
    let local = !runqempty(unsafe { &(*pp).runq });
    if local || sched.runqsize.load(Ordering::SeqCst) != 0 {
        startm(sched, pp, false);
        return false;
    }
    if sched.nmspinning.load(Ordering::SeqCst) + sched.npidle.load(Ordering::SeqCst) == 0
        && sched
            .nmspinning
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    {
        startm(sched, pp, true);
        return false;
    }
    let mut sl = sched.lock.lock();
    // The global queue again, under the lock globrunqput takes: a G put
    // there from now on is seen by the wakep that follows it, since the P
    // is idle by then.
    if sl.runq.size != 0 {
        drop(sl);
        startm(sched, pp, false);
        return false;
    }
    pidleput(&mut sl, sched, pp);
    let all_idle = sched.npidle.load(Ordering::SeqCst) as usize == sched.allp.len();
    drop(sl);
    // The P is idle, and this M sleeps next without looking at anything:
    // look now, as findrunnable's M does after idling its P. Whoever found
    // no idle P counted on the next M to idle one looking: the spinning M
    // we counted on above, if it found work and handed the search on
    // (resetspinning → wakep) before our pidleput, leaving more Gs in its
    // ring (seen in tests: a G readied by a timer, stuck there behind a G
    // that spun waiting for it, with our P idle); and a ready or an
    // addtimer that read npidle before our pidleput. SeqCst fence after
    // pidleput's SeqCst increment of npidle, pairing with the fence in
    // wakep before its load of npidle: either that wakep saw our P idle,
    // or the loads below see its G. Timers: time.rs module docs ("What the
    // argument needs", point 2).
    fence(Ordering::SeqCst);
    if runqs_queued(sched) || crate::intr::pending(sched) {
        wakep(sched);
    }
    let next = crate::time::timesleepuntil(sched);
    if next != 0 {
        crate::time::wakenetpoller(sched, next);
    }
    all_idle
}

/// Stops `mp`, whose locked G cannot run now, until that G is runnable
/// again (Go's `stoplockedm`): hands its P off, then sleeps until the G is
/// runnable and it has a P again. Returns true holding that P, the G
/// runnable; false, holding no P, when the scheduler is stopping.
///
/// # Safety
///
/// On g0 of `mp`, a scheduler M with a locked G that is not running.
unsafe fn stoplockedm(sched: &Sched, mp: *mut M) -> bool {
    // SAFETY: the contract; the wake-up protocol is in the comment above
    // lock_os_thread.
    unsafe {
        let gp = (*mp).lockedg;
        if gp.is_null() || (*gp).lockedm != mp {
            throw("stoplockedm: inconsistent locking");
        }
        if !(*mp).p.is_null() {
            let pp = releasep(mp);
            if handoffp(sched, pp) {
                checkdead(sched);
            }
        }
        loop {
            {
                let mut sl = sched.lock.lock();
                let pp = core::mem::replace(&mut (*mp).nextp, null_mut());
                if sched.stopping.load(Ordering::SeqCst) {
                    if !pp.is_null() {
                        pidleput(&mut sl, sched, pp);
                    }
                    (*mp).sleeping.store(crate::bound::AWAKE, Ordering::Relaxed);
                    return false;
                }
                if !pp.is_null() {
                    // Given to us on mwantp, where we went with the G
                    // runnable.
                    (*mp).sleeping.store(crate::bound::AWAKE, Ordering::Relaxed);
                    acquirep(mp, pp);
                    return true;
                }
                // SeqCst store, then locked_runnable's SeqCst load: the
                // M's half of the wake-up argument (bound.rs).
                (*mp).sleeping.store(crate::bound::LOCKED, Ordering::SeqCst);
                if crate::bound::locked_runnable(gp) {
                    if crate::bound::takep_or_wait(&mut sl, sched, mp) {
                        return true;
                    }
                } else {
                    (*mp).lockedsleep = true;
                    sl.nmidlelocked += 1;
                }
            }
            crate::cpu::notesleep_woken(sched.platform, &(*mp).park);
            noteclear(&(*mp).park);
        }
    }
}

/// Associates P `pp` with M `mp` (Go's `acquirep`).
///
/// # Safety
///
/// `pp` is an idle P no M holds; `mp` holds none.
pub(crate) unsafe fn acquirep(mp: *mut M, pp: *mut P) {
    // SAFETY: the contract.
    unsafe {
        wirep(mp, pp);
        crate::trace::proc(mp, pp, true);
    }
}

/// [`acquirep`] without the trace's P start (Go's `wirep`): for
/// `exitsyscallfast` taking back the P its call kept.
///
/// # Safety
///
/// As [`acquirep`].
#[inline(always)]
pub(crate) unsafe fn wirep(mp: *mut M, pp: *mut P) {
    // SAFETY: the contract: nobody else holds pp.
    unsafe {
        debug_assert!(
            (*mp).p.is_null() && (*pp).m.load(Ordering::Relaxed).is_null(),
            "acquirep: P or M busy"
        );
        (*mp).p = pp;
        // Relaxed: read by sysmon only, to find the P's thread.
        (*pp).m.store(mp, Ordering::Relaxed);
        (*pp)
            .status
            .store(crate::runtime2::PRUNNING, Ordering::Relaxed);
        let rt = (*mp).rt;
        // Only while Ms wait for a P is the clock read at all.
        if !rt.is_null() && (*rt).nmwantp.load(Ordering::Relaxed) != 0 {
            (*mp).pwhen = (*rt).platform.nanotime();
        }
    }
}

/// Disassociates `mp` from its P and returns the P (Go's `releasep`).
///
/// # Safety
///
/// `mp` holds a P.
pub(crate) unsafe fn releasep(mp: *mut M) -> *mut P {
    // SAFETY: the contract.
    unsafe {
        let pp = (*mp).p;
        crate::trace::proc(mp, pp, false);
        (*pp).m.store(null_mut(), Ordering::Relaxed);
        (*mp).p = null_mut();
        pp
    }
}

/// Puts an idle M on the idle list (Go's `mput`).
fn mput(sl: &mut SchedLocked, mp: *mut M) {
    // SAFETY: mp is the caller's own M, about to sleep.
    unsafe {
        (*mp).schedlink = sl.midle;
        (*mp).onmidle = true;
    }
    sl.midle = mp;
}

/// Takes an idle M off the idle list (Go's `mget`).
fn mget(sl: &mut SchedLocked) -> *mut M {
    let mp = sl.midle;
    if !mp.is_null() {
        // SAFETY: mp is on the idle list, which the lock guards.
        unsafe {
            sl.midle = (*mp).schedlink;
            (*mp).onmidle = false;
        }
    }
    mp
}

/// Puts P `pp` on the idle list (Go's `pidleput`).
/// An M waiting for a P to run its bound Gs (`mwantp`) gets it instead.
pub(crate) fn pidleput(sl: &mut SchedLocked, sched: &Sched, pp: *mut P) {
    let wm = crate::bound::wantpget(sl, sched);
    if !wm.is_null() {
        // SAFETY: wm sleeps in stopm or stoplockedm and reads nextp only
        // after its note is woken.
        unsafe {
            (*wm).nextp = pp;
            notewakeup(sched.platform, &(*wm).park);
        }
        return;
    }
    // SAFETY: pp was just released by its M; the lock guards the list.
    unsafe {
        (*pp).link = sl.pidle;
        (*pp)
            .status
            .store(crate::runtime2::PIDLE, Ordering::Relaxed);
    }
    sl.pidle = pp;
    sched.npidle.fetch_add(1, Ordering::SeqCst);
}

/// Takes a P off the idle list (Go's `pidleget`).
pub(crate) fn pidleget(sl: &mut SchedLocked, sched: &Sched) -> *mut P {
    let pp = sl.pidle;
    if !pp.is_null() {
        // SAFETY: pp is on the idle list, which the lock guards.
        unsafe { sl.pidle = (*pp).link };
        sched.npidle.fetch_sub(1, Ordering::SeqCst);
        // The first P out of the idle list wakes sysmon from its deep sleep.
        crate::sysmon::wakeifwaiting(sched);
    }
    pp
}

// ---------------------------------------------------------------------
// Making Gs.

/// Puts a dead G on P's free list, moving a batch to the global list when
/// the local one is long (Go's `gfput`). Owner of `pp` only.
///
/// Every dead G is kept, with its stack, for the next spawn: freeing one
/// here cost a system call or two per goroutine (`munmap`, `madvise`)
/// after a burst. Idle Ms trim the global list lazily ([`gftrim`]).
fn gfput(sched: &Sched, pp: *mut P, gp: *mut G) {
    // SAFETY: pp is the caller's P; gp is dead and owned by the caller.
    unsafe {
        (*gp).schedlink = (*pp).gfree;
        (*pp).gfree = gp;
        (*pp).gfreecnt += 1;
        if (*pp).gfreecnt >= 64 {
            let mut sl = sched.lock.lock();
            while (*pp).gfreecnt >= 32 {
                let g = (*pp).gfree;
                (*pp).gfree = (*g).schedlink;
                (*pp).gfreecnt -= 1;
                gqueue_push(&mut sl.gfree, g);
            }
        }
    }
}

/// The fewest dead Gs the global free list keeps when trimmed: a batch of
/// spawns that size needs no new stack.
pub const GFREE_MAX: usize = 1024;

/// The most dead Gs [`gftrim`] frees per hold of the scheduler lock.
const GFTRIM_BATCH: usize = 256;

/// The most dead Gs one [`gftrim`] frees. The M that trims has given up
/// its P and is on its way to sleep, possibly as the timer sleeper: a
/// burst of 100,000 (a `munmap` each without stack chunks) kept it from
/// the timers for tens of milliseconds, and sleeping goroutines woke that
/// late (the image's sleep-order check, 7 runs in 60). The rest stays on
/// the list, cold, for the next intervals.
const GFTRIM_MAX: usize = 4 * GFTRIM_BATCH;

/// How often, at most, [`gftrim`] frees anything: the interval over which a
/// dead G must sit unused to be freed (Go frees dead Gs' stacks at a
/// garbage collection, at least every two minutes).
const GFTRIM_INTERVAL_NS: u64 = 100_000_000;

/// A dead G off the global free list, keeping its low-water mark.
pub(crate) fn gfree_pop(sl: &mut SchedLocked) -> *mut G {
    let g = gqueue_pop(&mut sl.gfree);
    sl.gfree_low = sl.gfree_low.min(sl.gfree.size);
    g
}

/// Frees the dead Gs that sat unused on the global free list through the
/// whole interval since the last trim (its low-water mark), beyond
/// [`GFREE_MAX`], at most every [`GFTRIM_INTERVAL_NS`], in batches of
/// [`GFTRIM_BATCH`] with the lock released between. Called by an M that
/// found no work and gave up its P: off every hot path. A workload that
/// keeps spawning keeps its Gs; a burst's come back within two intervals
/// of idleness.
pub(crate) fn gftrim(sched: &Sched) {
    let now = sched.platform.nanotime();
    let (mut cold, nostack) = {
        let mut sl = sched.lock.lock();
        if now.saturating_sub(sl.gftrim_at) < GFTRIM_INTERVAL_NS {
            return;
        }
        sl.gftrim_at = now;
        let cold = sl
            .gfree_low
            .min(sl.gfree.size)
            .saturating_sub(GFREE_MAX)
            .min(GFTRIM_MAX);
        // A new interval: what nobody takes until the next trim is cold
        // then.
        sl.gfree_low = sl.gfree.size - cold;
        (
            cold,
            crate::lazystack::nostack_cold(&mut sl, GFREE_MAX, GFTRIM_MAX),
        )
    };
    crate::lazystack::nostack_trim(sched, nostack);
    while cold > 0 {
        let mut batch: heapless::Vec<*mut G, GFTRIM_BATCH> = heapless::Vec::new();
        {
            let mut sl = sched.lock.lock();
            while cold > 0 && !batch.is_full() {
                let g = gqueue_pop(&mut sl.gfree);
                if g.is_null() {
                    cold = 0;
                    break;
                }
                let _ = batch.push(g);
                cold -= 1;
            }
            sl.gfree_low = sl.gfree_low.min(sl.gfree.size);
        }
        gfree_release(sched, &batch);
    }
}

/// Frees every dead G on the global free lists (with stacks, then
/// without), [`GFTRIM_BATCH`] per hold of the lock; returns how many
/// (`Runtime::free_dead_goroutines`).
#[cfg(feature = "std")]
pub(crate) fn gffree(sched: &Sched) -> usize {
    let mut freed = 0;
    loop {
        let mut batch: heapless::Vec<*mut G, GFTRIM_BATCH> = heapless::Vec::new();
        {
            let mut sl = sched.lock.lock();
            while !batch.is_full() {
                let mut g = gfree_pop(&mut sl);
                if g.is_null() {
                    g = crate::lazystack::nostack_pop(&mut sl);
                }
                if g.is_null() {
                    break;
                }
                let _ = batch.push(g);
            }
        }
        if batch.is_empty() {
            return freed;
        }
        freed += batch.len();
        gfree_release(sched, &batch);
    }
}

/// Frees dead Gs and their stacks for good, outside the scheduler lock.
pub(crate) fn gfree_release(sched: &Sched, gs: &[*mut G]) {
    // SAFETY: the Gs are listed in allgs (made by gslab::galloc), dead
    // and on no list.
    unsafe { sched.allgs.lock().unlist(gs) };
    let mut stacks = crate::stack::FreeBatch::new();
    for &g in gs {
        // SAFETY: g is dead, on no list and out of allgs: ours alone.
        if let Some(mem) = unsafe { (*g).stackmem.take() } {
            stacks.push(mem);
        }
    }
    stacks.flush();
    // SAFETY: as above; nothing refers to them any more.
    unsafe { sched.allgs.lock().free(gs) };
}

/// Takes a dead G (with its stack) from P's free list, refilling it from the
/// global list when empty (Go's `gfget`). Null if there is none. Owner of
/// `pp` only.
pub(crate) fn gfget(sched: &Sched, pp: *mut P) -> *mut G {
    // SAFETY: pp is the caller's P; the global list is under the lock.
    unsafe {
        if (*pp).gfree.is_null() {
            let mut sl = sched.lock.lock();
            while (*pp).gfreecnt < 32 {
                let g = gfree_pop(&mut sl);
                if g.is_null() {
                    break;
                }
                (*g).schedlink = (*pp).gfree;
                (*pp).gfree = g;
                (*pp).gfreecnt += 1;
            }
        }
        let gp = (*pp).gfree;
        if !gp.is_null() {
            (*pp).gfree = (*gp).schedlink;
            (*pp).gfreecnt -= 1;
            (*gp).schedlink = null_mut();
        }
        gp
    }
}

/// A G for `f`: a reused dead one with its stack or, if there is none,
/// one from [`lazystack::newg`](crate::lazystack::newg) (Go's
/// `newproc1`). It is runnable, with a fresh goid, on no queue yet. With
/// `lazy`, a G that has no stack gets one when it first runs; without,
/// now (so the failure to get one is the caller's `Err`).
///
/// `pp` is the caller's P, or null from a thread that is not an M.
#[inline(always)]
pub(crate) fn newproc1<F: FnOnce() + Send + 'static>(
    sched: &Sched,
    pp: *mut P,
    f: F,
    site: &'static Location<'static>,
    lazy: bool,
) -> Result<*mut G, StackError> {
    // SAFETY: pp, if not null, is the caller's P: its list is ours.
    let local_empty = !pp.is_null() && unsafe { (*pp).gfree.is_null() };
    let mut gp = if pp.is_null() {
        gfree_pop(&mut sched.lock.lock())
    } else if lazy && local_empty {
        // No lock for the global list: stacks there go to first runs.
        null_mut()
    } else {
        gfget(sched, pp)
    };
    // SAFETY: gp is dead or new: nobody else refers to it.
    unsafe {
        if gp.is_null() {
            gp = crate::lazystack::newg(sched, pp, lazy)?;
            newg_name(gp, pp, site);
            crate::lazystack::gostartcall(gp, f, lazy);
        } else {
            newg_name(gp, pp, site);
            // Dead Gs on the free lists have stacks of at least STACK_MIN.
            gostartcall(gp, f);
        }
    }
    crate::trace::gocreate(sched, pp, gp);
    sched.ngoroutines.fetch_add(1, Ordering::Relaxed);
    if !pp.is_null() {
        // SAFETY: pp is the caller's P.
        unsafe { PCounters::add(&(*pp).stats.spawned, 1) };
    }
    Ok(gp)
}

/// Gives a new or reused G its id and spawn site.
///
/// # Safety
///
/// `gp` is dead or new: nobody else refers to it. `pp` as for
/// [`newproc1`].
#[inline(always)]
unsafe fn newg_name(gp: *mut G, pp: *mut P, site: &'static Location<'static>) {
    // SAFETY: the contract.
    unsafe {
        (*gp).goid.store(pgoid(pp), Ordering::Relaxed);
        (*gp)
            .spawn_site
            .store(core::ptr::from_ref(site).cast_mut(), Ordering::Relaxed);
        (*gp).force = crate::teardown::FORCE_NONE;
    }
}

/// Starts a G running `f` (Go's `newproc`, the `go` statement) on the
/// current scheduler and returns its goroutine id. From a G, the new G
/// takes the P's `runnext`; from a thread that is not an M (`sched` given),
/// it goes on the global queue. Then an idle P gets an M (`wakep`).
/// `lazy`: see [`newproc1`].
///
/// # Panics
///
/// From a thread that is neither an M of a scheduler nor given `sched`.
#[track_caller]
pub(crate) fn newproc<F: FnOnce() + Send + 'static>(
    sched: Option<&Sched>,
    f: F,
    lazy: bool,
) -> Result<u64, StackError> {
    // The `go` / `spawn` call, for dumps (every caller tracks it).
    let site = Location::caller();
    let gp = getg();
    // On an M of the scheduler asked for (or of any, if none was named)?
    // SAFETY: a non-null current G has a live M.
    let here = if gp.is_null() {
        core::ptr::null()
    } else {
        unsafe { (*(*gp).m).rt }
    };
    // Only with a P: a scheduler M's g0 may run user code without one (a
    // deadlock hook, a timer callback on an idle M), and then the new G
    // goes on the global queue like one started from outside.
    // SAFETY: as above; the M is this thread's, so its p is ours to read.
    let in_rt = !here.is_null()
        && sched.is_none_or(|s| core::ptr::eq(s, here))
        && unsafe { !(*(*gp).m).p.is_null() };
    if in_rt {
        // Fast path, on the goroutine's own stack: its P has a dead G at
        // hand, so nothing below allocates, takes a lock or starts a
        // thread (Go hops to g0 for all of newproc; it has to, since its
        // stacks move and its goroutines are preempted, ours do neither).
        // SAFETY: on a user G of a scheduler M (here is its M's scheduler),
        // which holds a P while it runs user code; the P's owner-only
        // fields are ours while this G runs, and it cannot be switched out
        // in between.
        unsafe {
            let mp = (*gp).m;
            let pp = (*mp).p;
            // (A dead G without a stack does too, for a spawn that lets
            // the G take its stack when it first runs: crate::lazystack.)
            let at_hand = !(*pp).gfree.is_null() || (lazy && !(*pp).gfree_nostack.is_null());
            if at_hand && (*mp).curg == gp {
                let sched = &*here;
                let newg = newproc1(sched, pp, f, site, lazy)?;
                let id = (*newg).goid();
                runqput_p(sched, pp, newg, true);
                if wakep_needed_after_put(sched) {
                    crate::systemstack(|| wakep(sched));
                }
                return Ok(id);
            }
        }
        return crate::systemstack(move || {
            // SAFETY: on g0 of a scheduler M holding a P (Ms run user code
            // only with a P).
            unsafe {
                let mp = (*getg()).m;
                let sched = &*(*mp).rt;
                let pp = (*mp).p;
                let newg = newproc1(sched, pp, f, site, lazy)?;
                let id = (*newg).goid();
                runqput_p(sched, pp, newg, true);
                wakep(sched);
                Ok(id)
            }
        });
    }
    let sched = sched.expect("gokernel: go or spawn called outside a gokernel runtime");
    // Holding no P: counted until the G is queued (crate::spawning).
    let spawning = crate::spawning::Spawning::begin(sched);
    let newg = newproc1(sched, null_mut(), f, site, lazy)?;
    // SAFETY: newg is new and ours.
    let id = unsafe { (*newg).goid() };
    let mut sl = sched.lock.lock();
    globrunqput(&mut sl, sched, newg);
    spawning.end_locked(&mut sl);
    drop(sl);
    wakep(sched);
    Ok(id)
}

// ---------------------------------------------------------------------
// Run queues.

/// Puts `gp` at the tail of the global queue (Go's `globrunqput`).
pub(crate) fn globrunqput(sl: &mut SchedLocked, sched: &Sched, gp: *mut G) {
    gqueue_push(&mut sl.runq, gp);
    sched.runqsize.store(sl.runq.size as u32, Ordering::SeqCst);
}

/// [`globrunqput`] under the lock, then [`wakep`]: work appeared on the
/// global queue, an idle P may take it (globrunqput's SeqCst store is the
/// fence: [`wakep_after_put`]).
#[inline(never)]
fn globrunqput_wakep(sched: &Sched, gp: *mut G) {
    globrunqput(&mut sched.lock.lock(), sched, gp);
    wakep_after_put(sched);
}

/// Puts a batch on the global queue, in order (Go's `globrunqputbatch`).
fn globrunqputbatch(sl: &mut SchedLocked, sched: &Sched, batch: &[*mut G]) {
    for &gp in batch {
        gqueue_push(&mut sl.runq, gp);
    }
    sched.runqsize.store(sl.runq.size as u32, Ordering::SeqCst);
}

/// Takes a fair share of the global queue (at most `max` if non-zero):
/// returns one G and puts the rest on `pp`'s ring (Go's `globrunqget`).
#[inline(always)]
fn globrunqget(sl: &mut SchedLocked, sched: &Sched, pp: *mut P, max: usize) -> *mut G {
    let size = sl.runq.size;
    if size == 0 {
        return null_mut();
    }
    let mut n = (size / sched.allp.len() + 1).min(size);
    if max > 0 {
        n = n.min(max);
    }
    n = n.min(RUNQ_LEN / 2);
    let gp = gqueue_pop(&mut sl.runq);
    for _ in 1..n {
        let g = gqueue_pop(&mut sl.runq);
        // SAFETY: pp is the caller's P. Its ring has room: the caller found
        // it empty, and n <= RUNQ_LEN / 2.
        let overflow = runqput(unsafe { &(*pp).runq }, g, false);
        debug_assert!(overflow.is_none(), "globrunqget: local ring overflowed");
    }
    sched.runqsize.store(sl.runq.size as u32, Ordering::SeqCst);
    gp
}

/// `runqput` on P `pp`, sending an overflow batch to the global queue and
/// keeping the high-water mark. Owner of `pp` only.
fn runqput_p(sched: &Sched, pp: *mut P, gp: *mut G, next: bool) {
    // SAFETY: pp is the caller's P; only its (atomic) queue and counters
    // are borrowed, which other Ms may read meanwhile.
    let (runq, stats) = unsafe { (&(*pp).runq, &(*pp).stats) };
    if let Some(batch) = runqput(runq, gp, next) {
        globrunqputbatch(&mut sched.lock.lock(), sched, &batch);
    }
    // Only the owner writes the high-water mark: a load and a store, no
    // read-modify-write, on this hot path. It counts the ring (plus one
    // for runnext, taken or not: a cheap upper bound).
    let n = runq.len_owner() as u32 + 1;
    if n > stats.runq_hwm.load(Ordering::Relaxed) {
        stats.runq_hwm.store(n, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------
// Scheduling.

/// A walk over `0..count` in a pseudo-random order: start anywhere, step
/// by a stride coprime with `count`, so every index comes up exactly once
/// (Go's `randomOrder`).
pub struct RandomOrder {
    count: u32,
    coprimes: Vec<u32>,
}

impl RandomOrder {
    /// The walks over `0..count` (`count >= 1`).
    ///
    /// # Panics
    ///
    /// If `count` is 0.
    pub fn new(count: u32) -> Self {
        fn gcd(mut a: u32, mut b: u32) -> u32 {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        }
        assert!(count >= 1, "RandomOrder over an empty range");
        let coprimes = (1..=count).filter(|&i| gcd(i, count) == 1).collect();
        RandomOrder { count, coprimes }
    }

    /// The walk chosen by the random number `i`.
    pub fn start(&self, i: u32) -> RandomEnum {
        RandomEnum {
            left: self.count,
            count: self.count,
            pos: i % self.count,
            inc: self.coprimes[(i / self.count) as usize % self.coprimes.len()],
        }
    }
}

/// One walk of a [`RandomOrder`] (Go's `randomEnum`).
pub struct RandomEnum {
    left: u32,
    count: u32,
    pos: u32,
    inc: u32,
}

impl Iterator for RandomEnum {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let p = self.pos;
        self.pos = (self.pos + self.inc) % self.count;
        Some(p)
    }
}

/// The M's next random number (xorshift64*).
fn fastrand(mp: *mut M) -> u32 {
    // SAFETY: mp is the caller's own M.
    let x = unsafe { &mut (*mp).fastrand };
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
}

/// Tries to steal a batch of Gs from another P, up to four passes over all
/// Ps in a random order; the last pass may take `runnext` too (Go's
/// `stealWork`). On g0 of `mp`, which holds `pp`.
fn stealwork(sched: &Sched, mp: *mut M, pp: *mut P) -> *mut G {
    const STEAL_TRIES: u32 = 4;
    for i in 0..STEAL_TRIES {
        let steal_runnext = i == STEAL_TRIES - 1;
        for idx in sched.steal_order.start(fastrand(mp)) {
            if sched.stopping.load(Ordering::Relaxed) {
                return null_mut();
            }
            let p2 = sched.allp[idx as usize];
            if p2 == pp {
                continue;
            }
            // SAFETY: Ps live as long as the scheduler; pp is ours.
            let (own, victim) = unsafe { (&(*pp).runq, &(*p2).runq) };
            if let Some(gp) = runqsteal(own, victim, steal_runnext) {
                let n = 1 + own.len() as u64;
                crate::trace::steal(sched, pp, p2, n);
                // SAFETY: pp is ours.
                unsafe { PCounters::add(&(*pp).stats.stolen, n) };
                return gp;
            }
        }
    }
    null_mut()
}

/// The common case of [`findrunnable`], inline in `schedule`: a G of this
/// M's own queues or this P's, after the interrupt posts and this P's
/// timers, with the global queue first now and then (fairness). Returns
/// the G and whether it inherits the time slice; `None` leaves the rest
/// (and a stopping scheduler) to `findrunnable`, which starts with this.
///
/// On g0 of a scheduler M holding P `pp`.
#[inline(always)]
fn findlocal(sched: &Sched, mp: *mut M, pp: *mut P) -> Option<(*mut G, bool)> {
    if sched.stopping.load(Ordering::SeqCst) {
        return None;
    }
    // Interrupt handlers' posts (Go's netpoll injection; crate::intr).
    if crate::intr::pending(sched) {
        crate::intr::injectglist(sched);
    }
    // This P's expired timers (one relaxed load when it has none).
    crate::time::checktimers(sched, pp, 0);
    // Fairness: now and then, the global queue first.
    // SAFETY: schedtick is touched only by the P's owner, us.
    let schedtick = unsafe { (*pp).schedtick.load(Ordering::Relaxed) };
    if sched.runqsize.load(Ordering::Relaxed) > 0 && schedtick % 61 == 0 {
        let gp = globrunqget(&mut sched.lock.lock(), sched, pp, 1);
        if !gp.is_null() {
            return Some((gp, false));
        }
    }
    // This M's own Gs (bound to it: see bound.rs) and this P's queue,
    // taking turns by the parity of schedtick; boundnext, like runnext,
    // inherits the time slice.
    // SAFETY: mp is this thread's M.
    let gp = unsafe { crate::bound::boundnextget(mp) };
    if !gp.is_null() {
        return Some((gp, true));
    }
    if schedtick & 1 == 0 {
        // SAFETY: as above.
        let gp = unsafe { crate::bound::boundqget(mp) };
        if !gp.is_null() {
            return Some((gp, false));
        }
    }
    // SAFETY: pp is ours. Only its run queue is borrowed: other Ms may
    // read it (and the counters) while we hold this.
    if let Some(x) = runqget(unsafe { &(*pp).runq }) {
        return Some(x);
    }
    // SAFETY: as above.
    let gp = unsafe { crate::bound::boundqget(mp) };
    if !gp.is_null() {
        return Some((gp, false));
    }
    if sched.runqsize.load(Ordering::Relaxed) != 0 {
        let gp = globrunqget(&mut sched.lock.lock(), sched, pp, 0);
        if !gp.is_null() {
            return Some((gp, false));
        }
    }
    None
}

/// Finds a runnable G for the current M (Go's `findRunnable`): local queue,
/// global queue, stealing; with nothing to do, gives up the P and sleeps
/// until woken with one. Returns the G and whether it inherits the time
/// slice, or `None` when the scheduler is stopping (the M then holds no P).
/// Out of line: `schedule` tries [`findlocal`] first.
///
/// On g0 of a scheduler M holding a P.
#[inline(never)]
fn findrunnable(sched: &Sched, mp: *mut M) -> Option<(*mut G, bool)> {
    'top: loop {
        // SAFETY: mp is ours; it holds a P at the top of each round.
        let pp = unsafe { (*mp).p };
        if let Some(x) = findlocal(sched, mp, pp) {
            return Some(x);
        }
        crate::trace::idle(mp, pp);
        // SAFETY: as in findlocal.
        let runq = unsafe { &(*pp).runq };
        if sched.stopping.load(Ordering::SeqCst) {
            // SAFETY: mp holds pp.
            let pp = unsafe { releasep(mp) };
            pidleput(&mut sched.lock.lock(), sched, pp);
            // SAFETY: mp is ours.
            if unsafe { (*mp).spinning } {
                // SAFETY: as above.
                unsafe { (*mp).spinning = false };
                sched.nmspinning.fetch_sub(1, Ordering::SeqCst);
            }
            return None;
        }
        // Every P's expired timers (an idle P, or one whose M is busy,
        // keeps its heap); the Gs they ready come to our queue.
        let (mut now, mut ran) = (0, false);
        for &p2 in &sched.allp {
            let (t, r) = crate::time::checktimers(sched, p2, now);
            (now, ran) = (t, ran | r);
        }
        // Goroutines the network poller has readied (crate::netpoll).
        ran |= crate::netpoll::findrunnable_netpoll(sched);
        if ran {
            // SAFETY: mp is this thread's M.
            let gp = unsafe { crate::bound::boundnextget(mp) };
            if !gp.is_null() {
                return Some((gp, true));
            }
            // SAFETY: as above.
            let gp = unsafe { crate::bound::boundqget(mp) };
            if !gp.is_null() {
                return Some((gp, false));
            }
            if let Some(x) = runqget(runq) {
                return Some(x);
            }
        }
        // Steal, if not too many Ms are at it already (at most half the
        // busy Ps' worth).
        let procs = sched.allp.len() as u32;
        // SAFETY: mp is ours.
        let spinning = unsafe { (*mp).spinning };
        if procs > 1
            && (spinning
                || 2 * sched.nmspinning.load(Ordering::SeqCst)
                    < procs - sched.npidle.load(Ordering::SeqCst))
        {
            if !spinning {
                // SAFETY: mp is ours.
                unsafe { (*mp).spinning = true };
                sched.nmspinning.fetch_add(1, Ordering::SeqCst);
            }
            let gp = stealwork(sched, mp, pp);
            if !gp.is_null() {
                return Some((gp, false));
            }
        }
        // Nothing to do: give up the P, after a last look at the global
        // queue under the lock.
        let all_idle = {
            let mut sl = sched.lock.lock();
            let gp = globrunqget(&mut sl, sched, pp, 0);
            if !gp.is_null() {
                return Some((gp, false));
            }
            // SAFETY: mp holds pp.
            unsafe { releasep(mp) };
            pidleput(&mut sl, sched, pp);
            // Every P idle (so no G running) and nothing queued.
            sched.npidle.load(Ordering::SeqCst) as usize == sched.allp.len() && sl.runq.size == 0
        };
        // Off the hot path now (the P is given up): free some dead Gs
        // that sat unused (gftrim).
        gftrim(sched);
        // SAFETY: mp is ours.
        let spinning = unsafe { (*mp).spinning };
        if spinning {
            // SAFETY: as above.
            unsafe { (*mp).spinning = false };
            // SeqCst, then the SeqCst fence below: pairs with wakep's fence
            // (see the module docs): a producer that missed us spinning is
            // seen by the re-checks that follow.
            sched.nmspinning.fetch_sub(1, Ordering::SeqCst);
        }
        // Not spinning too, as handoffp: a wakep that read npidle before
        // our pidleput's SeqCst increment left its G to its own P, which a
        // G that never yields holds for good (tests/sched.rs, nested
        // TestGoroutineParallelism). The fence pairs with wakep's.
        fence(Ordering::SeqCst);
        // Global queue again (a non-spinning M looked under the lock).
        if spinning && sched.runqsize.load(Ordering::SeqCst) != 0 {
            let mut sl = sched.lock.lock();
            if sl.runq.size != 0 && spin_on_idle_p(&mut sl, sched, mp) {
                continue 'top;
            }
        }
        // Interrupt handlers' posts (crate::intr) and every P's queue again.
        if ((spinning && crate::intr::pending(sched)) || runqs_queued(sched))
            && spin_on_idle_p(&mut sched.lock.lock(), sched, mp)
        {
            continue 'top;
        }
        if all_idle {
            checkdead(sched);
        }
        // With timers pending, one idle M sleeps until the next deadline.
        match crate::time::timersleep(sched, mp) {
            crate::time::Polled::GotP => continue 'top,
            crate::time::Polled::Stopping => return None,
            crate::time::Polled::Nothing => {}
        }
        // SAFETY: on g0 of mp, which holds no P now.
        if !unsafe { stopm(sched, mp) } {
            return None;
        }
        // SAFETY: mp is ours.
        let lockedg = unsafe { (*mp).lockedg };
        if !lockedg.is_null() {
            // Woken to run a goroutine started locked on an M of its own
            // (bound::newproc_locked): it is runnable and on no queue.
            return Some((lockedg, false));
        }
    }
}

/// Takes an idle P for `mp` and makes it a spinning M again (work turned
/// up after it stopped spinning); false if no P is idle. Under the lock.
pub(crate) fn spin_on_idle_p(sl: &mut SchedLocked, sched: &Sched, mp: *mut M) -> bool {
    let pp = pidleget(sl, sched);
    if pp.is_null() {
        return false;
    }
    // SAFETY: pp came off the idle list; mp is the caller's M and holds
    // no P.
    unsafe {
        acquirep(mp, pp);
        (*mp).spinning = true;
    }
    sched.nmspinning.fetch_add(1, Ordering::SeqCst);
    crate::cpu::wantm_taken(sched);
    true
}

/// Every P is idle and no G is runnable (Go's `checkdead`): if goroutines
/// are still alive, they are all parked, and unless something outside the
/// runtime wakes one, nothing ever will. Tells whoever asked
/// (`Runtime::block_on`); the Ms go to sleep either way.
pub(crate) fn checkdead(sched: &Sched) {
    let hooks = {
        // The caller saw every P idle a moment ago; since then an M may
        // have taken one (the timer sleeper, or an M woken by handoffp)
        // and be running the timers — off their heaps already — and the
        // Gs they ready. Decide under the lock, which every taking of an
        // idle P holds: with every P idle now, no M runs a G or a timer,
        // and none can start but from outside the runtime.
        let sl = sched.lock.lock();
        if sched.npidle.load(Ordering::SeqCst) as usize != sched.allp.len() || sl.runq.size != 0 {
            return;
        }
        // A goroutine waiting on another runtime can still be woken from
        // there, and one waiting on a timer (sleep) by the timer; an M at
        // work without a P (bound::ms_at_work) runs or takes a P again.
        if sched.ngoroutines() == 0
            || sched.external_waits.load(Ordering::SeqCst) != 0
            || crate::time::timesleepuntil(sched) != 0
            || crate::bound::ms_at_work(&sl, sched)
        {
            return;
        }
        // A thread without a P starting a goroutine (crate::spawning):
        // read after taking the hooks' lock, which a block_on counting
        // itself takes to add its hook.
        let hooks = sched.deadlock_hooks.lock();
        if crate::spawning::any(sched) {
            return;
        }
        // Called without the lock: a hook may add or remove hooks.
        hooks.iter().map(|(_, h)| h.clone()).collect::<Vec<_>>()
    };
    for hook in hooks {
        hook();
    }
}

/// The current M stops spinning because it found work; another M may
/// need to take over the search (Go's `resetspinning`).
fn resetspinning(sched: &Sched, mp: *mut M) {
    // SAFETY: mp is the caller's own M.
    unsafe { (*mp).spinning = false };
    sched.nmspinning.fetch_sub(1, Ordering::SeqCst);
    wakep(sched);
}

/// On g0: find a runnable G and run it (Go's `schedule`). Never returns.
///
/// On a bare M (no scheduler, as in the switch tests) there is nothing to
/// look for: the M ends, returning from [`mstart`]. A scheduler M that is
/// stopping ends the same way. An M with a locked G runs only that G: it
/// waits in `stoplockedm` until the G is runnable. An M holding a P while
/// others wait for one to run their bound Gs may give it to them first
/// (`bound::handoff_wanted`).
///
/// Only the scheduler calls it: it dereferences the current G as g0 of a
/// live M, so from a plain thread it would crash, and from a goroutine it
/// would run the scheduler on that goroutine's stack and abandon it. It is
/// not part of the public API:
///
/// ```compile_fail,E0603
/// gokernel::proc::schedule(); // private: only g0 of an M may call it
/// ```
#[inline(always)]
pub(crate) fn schedule() -> ! {
    // SAFETY: schedule runs on g0 of a live M.
    schedule_m(unsafe { (*getg()).m })
}

/// [`schedule`] for a caller that knows its M, `mp`.
#[inline(always)]
fn schedule_m(mp: *mut M) -> ! {
    // SAFETY: on g0 of mp, a live M.
    let rt = unsafe { (*mp).rt };
    if rt.is_null() {
        // SAFETY: a bare M (no scheduler) ends: on its g0, no G running.
        unsafe { mend(mp) }
    }
    // SAFETY: an M's scheduler outlives it.
    schedule_on(unsafe { &*rt }, mp)
}

/// [`schedule`] for a scheduler M `mp` of `sched`, on its g0.
#[inline(never)]
pub(crate) fn schedule_on(sched: &Sched, mp: *mut M) -> ! {
    // SAFETY: mp is ours.
    if unsafe { (*mp).tornup } {
        // Tearing down: the next goroutine to unwind, or the end.
        // SAFETY: on g0 of mp, stopping, running no G.
        unsafe { crate::teardown::mexit(sched, mp) }
    }
    // SAFETY: mp is ours.
    let lockedg = unsafe { (*mp).lockedg };
    if !lockedg.is_null() {
        // This M runs only its locked G: wait until it is runnable.
        // SAFETY: on g0 of mp, whose locked G just switched out; once
        // stoplockedm returns true the G is runnable and ours to run.
        if unsafe { stoplockedm(sched, mp) } {
            // Inheriting the time slice, as the hand-off M that took
            // the G off a queue (often runnext: a locked G and its
            // waker passing it back and forth) would have: a new slice
            // at every hand-off would keep sysmon from ever seeing the
            // chain's slice run out, so runnext would never be demoted
            // and the P's ring (a G its timer readied, say) would
            // starve for good on one P. A locked G taken from the ring
            // inherits too: it can only end the slice sooner.
            // SAFETY: as above.
            unsafe { execute(lockedg, true) }
        }
        // SAFETY: stopping (stoplockedm said so), on g0, no G running.
        unsafe { crate::teardown::mexit(sched, mp) }
    }
    // Ms wait for a P to run Gs bound to them: maybe give them ours.
    // SAFETY: on g0 of mp, holding a P and no locked G; stopm as at
    // the end of findrunnable.
    if sched.nmwantp.load(Ordering::Relaxed) != 0
        && unsafe { crate::bound::handoff_wanted(sched, mp) }
    {
        // SAFETY: on g0 of mp, which holds no P now.
        if !unsafe { stopm(sched, mp) } {
            // SAFETY: stopping (stopm said so), on g0, no G running.
            unsafe { crate::teardown::mexit(sched, mp) }
        }
        // SAFETY: mp is ours.
        let lockedg = unsafe { (*mp).lockedg };
        if !lockedg.is_null() {
            // Woken to run a goroutine started locked on it, as at the
            // end of findrunnable.
            // SAFETY: it is runnable, on no queue, and ours to run.
            unsafe { execute_on(mp, (*mp).p, lockedg, false) }
        }
    }
    // SAFETY: a running scheduler M holds a P here.
    let pp = unsafe { (*mp).p };
    // SAFETY: as above (and so execute_on need not check for none).
    unsafe { core::hint::assert_unchecked(!pp.is_null()) };
    // sysmon says the time slice is over (crate::sysmon), or, on a
    // scheduler no sysmon watches, the chain has had RUNNEXT_LIMIT
    // hand-offs: the runnext chain ends here, behind the queues.
    // SAFETY: pp is ours.
    if unsafe { (*pp).preempt.load(Ordering::Relaxed) || (*pp).runnext_streak >= RUNNEXT_LIMIT } {
        // SAFETY: as above; boundnext is this M's own.
        unsafe {
            (*pp).preempt.store(false, Ordering::Relaxed);
            (*pp).runnext_streak = 0;
            let gp = crate::bound::boundnextget(mp);
            if !gp.is_null() {
                crate::bound::boundput(mp, gp, false);
            }
        }
        // SAFETY: as above.
        if let Some(batch) = runqdemote(unsafe { &(*pp).runq }) {
            globrunqputbatch(&mut sched.lock.lock(), sched, &batch);
        }
    }
    let run = |pp, (gp, inherit)| -> ! {
        // SAFETY: mp is ours.
        if unsafe { (*mp).spinning } {
            resetspinning(sched, mp);
        }
        // SAFETY: gp is runnable and was taken off a queue by us; mp
        // is this M, pp its P.
        unsafe { execute_on(mp, pp, gp, inherit) }
    };
    if let Some(found) = findlocal(sched, mp, pp) {
        run(pp, found)
    }
    if let Some(found) = findrunnable(sched, mp) {
        // SAFETY: mp is ours; findrunnable may have changed its P.
        run(unsafe { (*mp).p }, found)
    }
    // SAFETY: findrunnable returns None only when stopping; on g0, no
    // G running.
    unsafe { crate::teardown::mexit(sched, mp) }
}

/// Runs `gp` on the current M (Go's `execute`): makes it `m.curg`, marks
/// it running and jumps to it. With `inherit_time` (it came from
/// `runnext`) it continues the current time slice: `schedtick` does not
/// advance, and the hand-off streak grows.
///
/// # Safety
///
/// The caller must be on g0 of the current M, and `gp` must be a runnable
/// G (fresh from [`gostartcallfn`] or suspended by [`mcall`]) that no
/// other M is running or about to run.
pub unsafe fn execute(gp: *mut G, inherit_time: bool) -> ! {
    // SAFETY: we are on g0 (the contract), so g0.m is this M.
    unsafe {
        let mp = (*getg()).m;
        execute_on(mp, (*mp).p, gp, inherit_time)
    }
}

/// [`execute`] for a caller that knows its M and the M's P (or null).
///
/// # Safety
///
/// As [`execute`], and `mp` is the current M, `pp` its `p`.
#[inline(always)]
pub(crate) unsafe fn execute_on(mp: *mut M, pp: *mut P, gp: *mut G, inherit_time: bool) -> ! {
    // SAFETY: the contract.
    unsafe {
        debug_assert!((*mp).g0 == getg(), "execute called off g0");
        let bm = (*gp).boundm;
        if bm != mp {
            if !bm.is_null() {
                throw_g("execute: the goroutine is bound to another M", gp);
            }
            if (*mp).bindg {
                // Its first run: from now on the G runs only here.
                (*gp).boundm = mp;
                // On this M: a load and a store (see M::nbound_add).
                (*mp).nbound_add(1);
            }
        }
        (*mp).curg = gp;
        (*gp).m = mp;
        (*gp).casstatus(status::RUNNABLE, status::RUNNING);
        crate::trace::gostart(mp, pp, gp);
        if !pp.is_null() {
            if inherit_time {
                (*pp).runnext_streak += 1;
            } else {
                // Owner only: a load and a store, no read-modify-write.
                let t = (*pp).schedtick.load(Ordering::Relaxed);
                (*pp).schedtick.store(t.wrapping_add(1), Ordering::Relaxed);
                (*pp).runnext_streak = 0;
            }
            PCounters::add(&(*pp).stats.scheduled, 1);
        }
        gogo(&(*gp).sched)
    }
}

/// Ends M `mp`: back to `mstart`, which returns (Go's `mexit`, reached
/// through [`crate::teardown::mexit`] for a scheduler M).
///
/// # Safety
///
/// On g0 of `mp`, which runs no G.
pub(crate) unsafe fn mend(mp: *mut M) -> ! {
    // SAFETY: the contract: g0.sched was set by mstart1 and its frame is
    // live while the M runs.
    unsafe { gogo(&(*(*mp).g0).sched) }
}

/// The current goroutine if the caller is one that can park: a user G
/// running on an M of a scheduler. Null on a plain thread, on g0, and on
/// a bare M without a scheduler.
pub(crate) fn current_user_g() -> *mut G {
    let gp = getg();
    if gp.is_null() {
        return null_mut();
    }
    // SAFETY: a non-null current G has a live M (set by mstart / execute).
    unsafe {
        let mp = (*gp).m;
        if mp.is_null() || (*mp).curg != gp || (*mp).rt.is_null() {
            null_mut()
        } else {
            gp
        }
    }
}

/// [`current_user_g`], or a panic naming the API `what` that was called
/// outside a goroutine of a gokernel runtime.
#[track_caller]
pub(crate) fn require_user_g(what: &str) -> *mut G {
    let gp = current_user_g();
    assert!(
        !gp.is_null(),
        "gokernel::{what} called outside a goroutine of a gokernel runtime"
    );
    gp
}

/// Yields the processor: the current G goes to its M's own queue (a
/// migrating scheduler: the global queue) and the M runs something else
/// (Go's `Gosched`).
///
/// # Panics
///
/// Outside a goroutine of a scheduler.
#[track_caller]
#[inline]
pub fn gosched() {
    // Outside any goroutine: a clear panic. (On g0 `mcall` itself is a
    // named fatal error, and a G of a bare M without a scheduler is
    // stopped by gosched_m.)
    let gp = getg();
    assert!(
        !gp.is_null(),
        "gokernel::gosched called outside a goroutine of a gokernel runtime"
    );
    // SAFETY: a non-null current G is live while it runs.
    if unsafe { (*gp).atomicstatus.load(Ordering::Relaxed) } == status::SYSCALL {
        // Inside a blocking call: out of it for the yield (crate::syscall).
        // SAFETY: the running user G, in a call.
        unsafe { crate::syscall::insyscall(gosched) };
        return;
    }
    // SAFETY: on a G of an M; gosched_m checks for a scheduler.
    unsafe { mcall(gosched_m) };
}

/// On g0: `gp` yields (Go's `gosched_m`): runnable, on its M's own queue
/// if it is bound, on the global queue otherwise.
///
/// # Safety
///
/// Only [`mcall`] calls it.
pub(crate) unsafe extern "C" fn gosched_m(gp: *mut G) {
    stackcheck(gp);
    // SAFETY: gp was running on this M and is now suspended.
    unsafe {
        let rt = (*(*gp).m).rt;
        if rt.is_null() {
            throw_g("gosched on a goroutine of an M without a scheduler", gp);
        }
        let sched = &*rt;
        (*gp).casstatus(status::RUNNING, status::RUNNABLE);
        let mp = dropg(gp);
        crate::trace::gostop(mp, gp, crate::trace::EventKind::GoStop);
        if !(*gp).lockedm.is_null() {
            // Runnable and on no queue: its M's schedule (stoplockedm)
            // sees it, after handing the P to whoever has work.
        } else if !(*gp).boundm.is_null() {
            // Bound to this M: the tail of its own queue.
            crate::bound::boundput(mp, gp, false);
        } else {
            // The global queue, as in Go: a yielding goroutine may continue
            // on any P, which is what spreads yielding work over busy Ps.
            globrunqput_wakep(sched, gp);
            // (Nothing kept across the call: no registers to save above.)
            schedule()
        }
        schedule_on(sched, mp)
    }
}

/// Parks the current G (Go's `gopark`): on g0 it becomes waiting and
/// `unlockf(gp, lock)` runs; if that returns false the G resumes at once,
/// otherwise the M runs something else until someone calls [`goready`].
/// `reason` and the time are recorded for dumps (Go's `waitreason`,
/// `waitsince`).
///
/// `unlockf` runs on g0 after the G's context is saved, so a waker that
/// learns of the G through it can never ready a G that is still running.
/// Once it returns true it must not touch the G.
///
/// # Safety
///
/// On a user G of a scheduler M. `unlockf` must follow the rules above
/// and `lock` must be valid for it.
pub unsafe fn gopark(
    unlockf: unsafe fn(*mut G, *mut ()) -> bool,
    lock: *mut (),
    reason: WaitReason,
) {
    // SAFETY: the contract: the current G has a live M.
    unsafe {
        let gp = getg();
        // A scheduler tearing down unwinds its goroutines at their parks
        // (crate::teardown).
        crate::teardown::checkforce(gp, false);
        // Relaxed: read only by dumps, which take what they find.
        (*gp).waitreason.store(reason as u8, Ordering::Relaxed);
        (*gp)
            .waitsince
            .store(crate::traceback::cputicks(), Ordering::Relaxed);
        crate::traceback::record_park(gp);
        if (*gp).atomicstatus.load(Ordering::Relaxed) == status::SYSCALL {
            // Inside a blocking call: parks without a P (crate::syscall).
            return crate::syscall::gopark_insyscall(unlockf, lock);
        }
        let mp = (*gp).m;
        (*mp).waitunlockf = Some(unlockf);
        (*mp).waitlock = lock;
        mcall(park_m);
        crate::teardown::checkforce(gp, true);
    }
}

/// On g0: the G parks (Go's `park_m`).
///
/// # Safety
///
/// Only [`mcall`] calls it, from [`gopark`].
unsafe extern "C" fn park_m(gp: *mut G) {
    stackcheck(gp);
    // SAFETY: gp was running on this M and is now suspended.
    unsafe {
        let mp = (*gp).m;
        (*gp).casstatus(status::RUNNING, status::WAITING);
        dropg(gp);
        crate::trace::gostop(mp, gp, crate::trace::EventKind::GoBlock);
        if let Some(pp) = (*mp).p.as_ref() {
            PCounters::add(&pp.stats.parked, 1);
        }
        if let Some(unlockf) = (*mp).waitunlockf.take() {
            let lock = core::mem::replace(&mut (*mp).waitlock, null_mut());
            if !unlockf(gp, lock) {
                crate::trace::gounblock(&*(*mp).rt, gp, (*mp).g0);
                (*gp).casstatus(status::WAITING, status::RUNNABLE);
                execute(gp, true);
            }
        }
        schedule_m(mp)
    }
}

/// Makes a parked G runnable (Go's `goready`): it takes the current P's
/// `runnext`, or, from a thread that is not an M, goes on the global
/// queue; then an idle P gets an M.
///
/// # Safety
///
/// `gp` must be a G of a scheduler parked by [`gopark`] whose unlock
/// function handed it to this caller; it is readied once.
pub unsafe fn goready(gp: *mut G) {
    // SAFETY: the contract is ours.
    unsafe { ready::<true>(gp) }
}

/// [`goready`], choosing where the G goes on the current P (Go's `ready`):
/// `runnext` if `NEXT`, else the tail of the ring (timers use that, so Gs
/// they ready together run in deadline order). A constant, so `goready`
/// compiles to what it was before timers.
///
/// # Safety
///
/// As [`goready`].
#[inline]
pub(crate) unsafe fn ready<const NEXT: bool>(gp: *mut G) {
    // SAFETY: the contract: gp is parked and ours to ready.
    let sched = unsafe { &*(*gp).rt };
    if sched.stopping.load(Ordering::SeqCst) {
        // A runtime that is shutting down runs no more goroutines.
        return;
    }
    let cur = getg();
    // SAFETY: the contract: gp is parked and ours to ready; its boundm
    // and lockedm were written by its own M before it parked, which the
    // wait it parked on orders before this call.
    unsafe {
        let bm = (*gp).boundm;
        if !bm.is_null() {
            (*gp).casstatus(status::WAITING, status::RUNNABLE);
            if !(*gp).lockedm.is_null() {
                crate::trace::gounblock(sched, gp, cur);
                // On no queue: its M waits for exactly this G.
                crate::bound::readylocked(sched, bm);
            } else if !cur.is_null() && (*cur).m == bm {
                crate::trace::gounblock_m(bm, gp);
                // On its own M's thread: that M's own queue, no lock.
                crate::bound::boundput(bm, gp, NEXT);
            } else {
                crate::trace::gounblock(sched, gp, cur);
                crate::bound::readyhome(sched, bm, gp);
            }
            return;
        }
    }
    // SAFETY: a non-null current G has a live M.
    let on_m = !cur.is_null() && unsafe { (*(*cur).m).rt == (*gp).rt && !(*(*cur).m).p.is_null() };
    // SAFETY: on_m: cur's M is this thread's, of gp's scheduler.
    unsafe { crate::trace::gounblock_m_or(on_m, sched, gp, cur) };
    if on_m {
        // On the caller's own stack, as newproc's fast path: no
        // `systemstack` hop (two stack switches, about 50 instructions).
        // SAFETY: on a G (or g0) of an M of gp's scheduler holding a P:
        // the P's owner-only fields are this M's while the caller runs,
        // and a goroutine is not switched out in between (no preemption).
        unsafe {
            (*gp).casstatus(status::WAITING, status::RUNNABLE);
            runqput_p(sched, (*(*cur).m).p, gp, NEXT);
        }
        // Only starting an M needs g0 (it may create a thread). After a
        // put to runnext, its swap is the fence (wakep_needed_after_put).
        if if NEXT {
            wakep_needed_after_put(sched)
        } else {
            wakep_needed(sched)
        } {
            crate::systemstack(|| wakep(sched));
        }
    } else {
        // SAFETY: as above.
        unsafe { (*gp).casstatus(status::WAITING, status::RUNNABLE) };
        globrunqput_wakep(sched, gp);
    }
}

// ---------------------------------------------------------------------
// Creating and tearing down a scheduler.

/// Per-P counters, as returned by [`Sched::pstats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PStats {
    /// P id.
    pub id: i32,
    /// Gs created by code running on this P.
    pub spawned: u64,
    /// Gs this P stole from others.
    pub stolen: u64,
    /// Parks of Gs running on this P.
    pub parked: u64,
    /// Gs this P ran (each resumption counts).
    pub scheduled: u64,
    /// The most Gs its local queue held at once.
    pub runq_hwm: u32,
    /// Gs in its local queue now.
    pub runq_len: usize,
}

/// Goroutines of a scheduler by status (see [`status`]), as
/// [`Sched::stats`] counts them: every G the scheduler holds, the dead
/// ones kept for reuse included.
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let gs = rt.block_on(|| gokernel::stats().goroutines).unwrap();
/// assert_eq!(gs.running, 1); // the main goroutine
/// assert_eq!(gs.live(), gs.runnable + gs.running + gs.waiting);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoroutineCounts {
    /// Allocated, not started ([`status::IDLE`]).
    pub idle: usize,
    /// On a run queue or on the way to one ([`status::RUNNABLE`]).
    pub runnable: usize,
    /// Running on an M ([`status::RUNNING`]), or in a blocking call on
    /// one ([`status::SYSCALL`]).
    pub running: usize,
    /// Parked ([`status::WAITING`]).
    pub waiting: usize,
    /// Finished; kept with their stacks for reuse ([`status::DEAD`]).
    pub dead: usize,
}

impl GoroutineCounts {
    /// Goroutines that exist and have not finished: runnable, running or
    /// waiting.
    ///
    /// ```
    /// let c = gokernel::proc::GoroutineCounts { runnable: 1, running: 2, waiting: 3, dead: 4, idle: 0 };
    /// assert_eq!(c.live(), 6);
    /// ```
    pub fn live(&self) -> usize {
        self.runnable + self.running + self.waiting
    }
}

/// A snapshot of a scheduler: what Go's `GODEBUG=schedtrace` prints, and
/// the per-P counters. [`Sched::stats`] makes it; hosted programs call
/// `Runtime::stats` or `gokernel::stats`.
///
/// Each count is read at one moment, but they are not all read at the same
/// moment: on a busy scheduler they need not add up exactly (a G may be
/// counted runnable and not be in any queue yet). On a quiescent one they
/// do: the runnable goroutines are those in the global queue and the Ps'
/// queues.
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
/// let s = rt.stats();
/// assert_eq!(s.procs, 2);
/// assert_eq!(s.idle_ps, 2); // nothing has run yet
/// assert_eq!(s.ps.len(), 2);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Ps (Go's `gomaxprocs`).
    pub procs: usize,
    /// Ps on the idle list (Go's `idleprocs`).
    pub idle_ps: usize,
    /// Ms whose threads are running (Go's `threads`).
    pub threads: usize,
    /// Ms looking for work without having found any yet (Go's
    /// `spinningthreads`).
    pub spinning_ms: usize,
    /// Ms asleep on the idle list, without a P (Go's `idlethreads`).
    pub idle_ms: usize,
    /// Ms with a goroutine locked to them by
    /// [`lock_os_thread`].
    pub locked_ms: usize,
    /// Locked Ms asleep until their goroutine can run (Go's
    /// `nmidlelocked`).
    pub idle_locked_ms: usize,
    /// Gs in the global run queue (Go's `runqueue`).
    pub runqueue: usize,
    /// Goroutines by status.
    pub goroutines: GoroutineCounts,
    /// Parked goroutines by wait reason ("chan receive", "sleep", …).
    pub waiting_by_reason: crate::traceback::WaitCounts,
    /// Every P's counters, by P id.
    pub ps: Vec<PStats>,
}

/// One line of Go's `GODEBUG=schedtrace` output, made from `s`
/// (Go's `schedtrace`, not detailed), `elapsed_ms` after the trace began:
///
/// ```text
/// SCHED 1004ms: gomaxprocs=2 idleprocs=0 threads=3 spinningthreads=0 idlethreads=1 lockedthreads=0 nmidlelocked=0 runqueue=0 [0 0] gidle=0 grunnable=1 grunning=2 gwaiting=8 gdead=5
/// ```
///
/// Go's fields first, under Go's names; then `lockedthreads` (Ms with a
/// locked goroutine); the bracket holds each P's run-queue length
/// (`runnext` included); then the goroutines by status. No newline. The
/// hosted runtime prints one such line every few milliseconds on stderr
/// when asked (`GOKERNEL_SCHEDTRACE=<ms>` or `Builder::schedtrace`).
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
/// let line = gokernel::proc::schedtrace(&rt.stats(), 7);
/// assert!(line.starts_with("SCHED 7ms: gomaxprocs=2 idleprocs=2 threads=0 "));
/// assert!(line.contains(" runqueue=0 [0 0] gidle=0 "));
/// ```
pub fn schedtrace(s: &Stats, elapsed_ms: u64) -> alloc::string::String {
    use core::fmt::Write;
    let mut out = alloc::string::String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "SCHED {elapsed_ms}ms: gomaxprocs={} idleprocs={} threads={} spinningthreads={} \
         idlethreads={} lockedthreads={} nmidlelocked={} runqueue={} [",
        s.procs,
        s.idle_ps,
        s.threads,
        s.spinning_ms,
        s.idle_ms,
        s.locked_ms,
        s.idle_locked_ms,
        s.runqueue
    );
    for (i, p) in s.ps.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = write!(out, "{sep}{}", p.runq_len);
    }
    let g = &s.goroutines;
    let _ = write!(
        out,
        "] gidle={} grunnable={} grunning={} gwaiting={} gdead={}",
        g.idle, g.runnable, g.running, g.waiting, g.dead
    );
    out
}

impl Sched {
    /// A scheduler with `procs` idle Ps, Gs of `stack_size` bytes, and no
    /// Ms yet (they start on demand).
    pub fn new(
        procs: usize,
        stack_size: usize,
        platform: &'static dyn crate::platform::Platform,
    ) -> Arc<Sched> {
        Self::with_options(procs, stack_size, platform, false)
    }

    /// [`Sched::new`], and with `report_panics` a panic in a goroutine
    /// (hosted: one not started by `spawn`, whose handle gets it) is
    /// reported on stderr and ends only that goroutine, instead of the
    /// process.
    pub fn with_options(
        procs: usize,
        stack_size: usize,
        platform: &'static dyn crate::platform::Platform,
        report_panics: bool,
    ) -> Arc<Sched> {
        Self::make(procs, stack_size, platform, report_panics, false)
    }

    /// [`Sched::with_options`] with Go's full migration: a goroutine that
    /// has started may resume on any M after it yields or parks, and
    /// started goroutines are stolen and go through the global queue as
    /// in Go. By default a started goroutine resumes only on the M it
    /// started on (see [`crate::bound`]).
    ///
    /// # Safety
    ///
    /// The program promises that no goroutine of this scheduler depends on
    /// staying on one M (one OS thread or CPU) between two scheduling
    /// points (a yield, a park, or any call that may do either): it holds
    /// no thread-local or per-CPU address, no reference into such data,
    /// and no thread-affine value (a lock keyed by thread, a `!Send`
    /// handle to thread state, an unwinding panic) across them. Compiled
    /// code breaks this without any reference in the source: LLVM computes
    /// a thread-local's address once per function and keeps it across
    /// calls, so a function that touches a `thread_local!` (or a kernel's
    /// per-CPU data) both before and after a switch may use the old M's
    /// copy afterwards.
    pub unsafe fn with_migration(
        procs: usize,
        stack_size: usize,
        platform: &'static dyn crate::platform::Platform,
        report_panics: bool,
    ) -> Arc<Sched> {
        Self::make(procs, stack_size, platform, report_panics, true)
    }

    fn make(
        procs: usize,
        stack_size: usize,
        platform: &'static dyn crate::platform::Platform,
        report_panics: bool,
        migrate: bool,
    ) -> Arc<Sched> {
        assert!(procs >= 1, "a scheduler needs at least one P");
        crate::traceback::ticks_init(platform);
        let allp: Vec<*mut P> = (0..procs)
            .map(|id| {
                Box::into_raw(Box::new(P {
                    id: id as i32,
                    m: AtomicPtr::new(null_mut()),
                    link: null_mut(),
                    status: AtomicU32::new(crate::runtime2::PIDLE),
                    schedtick: AtomicU32::new(0),
                    runnext_streak: 0,
                    syscalltick: AtomicU32::new(0),
                    preempt: core::sync::atomic::AtomicBool::new(false),
                    runq: crate::runq::Runq::new(),
                    gfree: null_mut(),
                    gfreecnt: 0,
                    gfree_nostack: null_mut(),
                    gfree_nostackcnt: 0,
                    goidcache: 0,
                    goidcacheend: 0,
                    stats: Default::default(),
                    timers: crate::time::Timers::new(),
                    trace: crate::trace::PTrace::new(),
                }))
            })
            .collect();
        let sched = Arc::new_cyclic(|self_weak| Sched {
            lock: spin::Mutex::new(SchedLocked {
                runq: GQueue::new(),
                midle: null_mut(),
                pidle: null_mut(),
                gfree: GQueue::new(),
                gfree_low: 0,
                gftrim_at: 0,
                gfree_nostack: GQueue::new(),
                gfree_nostack_low: 0,
                nmidlelocked: 0,
                mwantp: null_mut(),
            }),
            runqsize: AtomicU32::new(0),
            npidle: AtomicU32::new(0),
            nmspinning: AtomicU32::new(0),
            allp,
            allm: spin::Mutex::new(Vec::new()),
            allgs: spin::Mutex::new(crate::gslab::AllGs::new()),
            nmlive: AtomicU32::new(0),
            stopping: core::sync::atomic::AtomicBool::new(false),
            ngoroutines: core::sync::atomic::AtomicI64::new(0),
            stack_size,
            unguarded_stacks: core::sync::atomic::AtomicBool::new(false),
            platform,
            mnext: core::sync::atomic::AtomicI64::new(1),
            steal_order: RandomOrder::new(procs as u32),
            deadlock_hooks: spin::Mutex::new(Vec::new()),
            trace: Default::default(),
            report_panics,
            self_weak: self_weak.clone(),
            external_waits: AtomicU32::new(0),
            nspawning: AtomicU32::new(0),
            timerpoll: crate::time::TimerPoll::new(),
            netpoll: crate::netpoll::NetpollState::new(),
            nmlocked: AtomicU32::new(0),
            nmwantp: AtomicU32::new(0),
            migrate,
            teardown: crate::runtime2::TeardownBarrier::new(),
            cpus: crate::cpu::Cpus::new(),
            inject: crate::intr::Inject::new(),
            sysmon: crate::sysmon::Sysmon::new(procs),
            preempt: Default::default(),
        });
        crate::cpu::note_platform(platform);
        {
            let mut sl = sched.lock.lock();
            for &pp in sched.allp.iter().rev() {
                pidleput(&mut sl, &sched, pp);
            }
        }
        sched
    }

    /// Number of Ps.
    pub fn procs(&self) -> usize {
        self.allp.len()
    }

    /// User Gs that exist and have not finished.
    pub fn ngoroutines(&self) -> usize {
        self.ngoroutines.load(Ordering::Acquire).max(0) as usize
    }

    /// Gs ever allocated (each reused many times).
    pub fn nallgs(&self) -> usize {
        self.allgs.lock().len()
    }

    /// A snapshot of the scheduler: goroutines by status, the queues, the
    /// Ms and Ps (see [`Stats`] for how consistent it is). It takes the
    /// list of Gs, then the scheduler lock, one after the other; the
    /// scheduling paths pay nothing for it. It reads the status of every G
    /// ever allocated and not freed, so it costs time in proportion to
    /// them (4.4 ms for 200,000 Gs on the 2-core test machine); spawns
    /// that must allocate a new G wait for it meanwhile.
    ///
    /// ```
    /// use gokernel::platform::hosted::HOSTED;
    /// use gokernel::runtime2::Sched;
    ///
    /// let sched = Sched::new(3, gokernel::stack::STACK_MIN, &HOSTED);
    /// let s = sched.stats();
    /// assert_eq!((s.procs, s.idle_ps, s.threads, s.runqueue), (3, 3, 0, 0));
    /// assert_eq!(s.goroutines.live(), 0);
    /// ```
    pub fn stats(&self) -> Stats {
        let mut goroutines = GoroutineCounts::default();
        let mut waiting_by_reason = crate::traceback::WaitCounts::default();
        for &gp in self.allgs.lock().iter() {
            // SAFETY: a G in allgs is live while it is listed (we hold the
            // list); only its atomic status is borrowed. Acquire, like
            // readgstatus.
            match unsafe { &(*gp).atomicstatus }.load(Ordering::Acquire) {
                status::IDLE => goroutines.idle += 1,
                status::RUNNABLE => goroutines.runnable += 1,
                // In a blocking call (crate::syscall): running, in Go's
                // schedtrace too.
                status::RUNNING | status::SYSCALL => goroutines.running += 1,
                status::WAITING => {
                    goroutines.waiting += 1;
                    // SAFETY: as above; the reason is an atomic.
                    waiting_by_reason.add(unsafe { &*gp });
                }
                _ => goroutines.dead += 1,
            }
        }
        let (runqueue, idle_ms, idle_locked_ms) = {
            let sl = self.lock.lock();
            let mut n = 0;
            let mut mp = sl.midle;
            while !mp.is_null() {
                n += 1;
                // SAFETY: the idle list is under the lock we hold.
                mp = unsafe { (*mp).schedlink };
            }
            (sl.runq.size, n, sl.nmidlelocked as usize)
        };
        // Relaxed loads: statistics, ordered with nothing.
        Stats {
            procs: self.allp.len(),
            idle_ps: self.npidle.load(Ordering::Relaxed) as usize,
            threads: self.nmlive.load(Ordering::Relaxed) as usize,
            spinning_ms: self.nmspinning.load(Ordering::Relaxed) as usize,
            idle_ms,
            locked_ms: self.nmlocked.load(Ordering::Relaxed) as usize,
            idle_locked_ms,
            runqueue,
            goroutines,
            waiting_by_reason,
            ps: self.pstats(),
        }
    }

    /// A snapshot of every P's counters.
    pub fn pstats(&self) -> Vec<PStats> {
        self.allp
            .iter()
            .map(|&pp| {
                // SAFETY: Ps live as long as the scheduler. Only the
                // immutable id and the atomic counters and queue are
                // borrowed: the owner changes the other fields meanwhile.
                let (id, stats, runq) = unsafe { ((*pp).id, &(*pp).stats, &(*pp).runq) };
                PStats {
                    id,
                    spawned: stats.spawned.load(Ordering::Relaxed),
                    stolen: stats.stolen.load(Ordering::Relaxed),
                    parked: stats.parked.load(Ordering::Relaxed),
                    scheduled: stats.scheduled.load(Ordering::Relaxed),
                    runq_hwm: stats.runq_hwm.load(Ordering::Relaxed),
                    runq_len: runq.len(),
                }
            })
            .collect()
    }

    /// Starts a G running `f` (Go's `go` statement) and returns its id.
    /// From a G of this scheduler the new G takes the P's `runnext`; from
    /// any other thread it goes on the global queue. This is the spawn
    /// primitive of freestanding builds; hosted code uses
    /// `Runtime`.
    ///
    /// # Errors
    ///
    /// [`StackError`] if the goroutine's stack cannot be allocated (`f` is
    /// dropped): like every API that returns one, this gives the goroutine
    /// its stack now, not when it first runs ([`crate::lazystack`]).
    #[track_caller]
    pub fn go(&self, f: Box<dyn FnOnce() + Send + 'static>) -> Result<u64, StackError> {
        newproc(Some(self), f, false)
    }

    /// [`Sched::go`] for a goroutine locked to an M of its own, as if it
    /// began with [`lock_os_thread`]: an idle M that no started goroutine
    /// is bound to, or a new one (hosted: `spawn_locked`).
    ///
    /// # Errors
    ///
    /// As [`Sched::go`].
    ///
    /// # Panics
    ///
    /// When the platform starts no threads ([`crate::cpu`]) and no joined
    /// CPU is free; [`crate::cpu::try_go_locked`] returns an error instead.
    #[track_caller]
    pub fn go_locked(&self, f: Box<dyn FnOnce() + Send + 'static>) -> Result<u64, StackError> {
        crate::bound::newproc_locked(Some(self), f)
    }

    /// Registers `hook` to be called (on an M going idle) whenever every P
    /// is idle, nothing is runnable and goroutines are still alive: a
    /// deadlock if only goroutines can wake goroutines. Returns a key for
    /// [`remove_deadlock_hook`](Self::remove_deadlock_hook). Hooks are
    /// called without the list's lock: a hook may add or remove hooks, and
    /// one removed while a check is under way may be called once more.
    pub fn add_deadlock_hook(&self, hook: Box<dyn Fn() + Send + Sync>) -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let key = NEXT.fetch_add(1, Ordering::Relaxed);
        self.deadlock_hooks.lock().push((key, hook.into()));
        key
    }

    /// Removes a hook added by [`add_deadlock_hook`](Self::add_deadlock_hook).
    pub fn remove_deadlock_hook(&self, key: u64) {
        self.deadlock_hooks.lock().retain(|(k, _)| *k != key);
    }

    /// Stops the scheduler: Ms finish the G they are running, then stop
    /// looking for more; idle Ms, and Ms waiting for their locked G, are
    /// woken. Once every M has stopped, each unwinds the goroutines that
    /// started on it and have not finished (with unwinding; without it
    /// their stacks are leaked): see [`crate::teardown`]. Returns when
    /// every M's thread is done with the scheduler. Timers that have not
    /// fired are dropped without running; goroutines that never started
    /// are dropped unrun when the scheduler is. Called on one of the
    /// scheduler's own threads (a goroutine, a timer callback), which it
    /// would wait for, it is a fatal error naming the goroutine.
    pub fn shutdown(&self) {
        crate::teardown::refuse_shutdown_on_own_thread(self);
        self.stop();
        loop {
            // Acquire: pairs with mstart0's release decrement.
            let n = self.nmlive.load(Ordering::Acquire);
            if n == 0 {
                break;
            }
            self.platform.futexsleep(&self.nmlive, n, None);
        }
        crate::time::cleartimers(self);
        crate::teardown::keep_if_leaked(self);
    }

    /// The first half of [`shutdown`](Self::shutdown): sets `stopping`
    /// and wakes every sleeping M, without waiting.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // The M sleeping until the next timer is on no idle list.
        crate::time::netpollbreak(self);
        {
            let mut sl = self.lock.lock();
            loop {
                let mp = mget(&mut sl);
                if mp.is_null() {
                    break;
                }
                // SAFETY: mp sleeps in stopm; a null nextp tells it to exit.
                unsafe {
                    (*mp).nextp = null_mut();
                    notewakeup(self.platform, &(*mp).park);
                }
            }
            // Ms waiting for a P for their bound Gs: a null nextp tells
            // them to exit.
            loop {
                let mp = crate::bound::wantpget(&mut sl, self);
                if mp.is_null() {
                    break;
                }
                // SAFETY: mp sleeps in stopm or stoplockedm.
                unsafe {
                    (*mp).nextp = null_mut();
                    notewakeup(self.platform, &(*mp).park);
                }
            }
            // Locked Ms asleep in stoplockedm (the protocol above
            // lock_os_thread): a marked M has not been woken and has no
            // nextp, so this wake-up tells it to exit.
            for &mp in self.allm.lock().iter() {
                // SAFETY: Ms live as long as the scheduler; lockedsleep and
                // nmidlelocked are under the lock we hold.
                unsafe {
                    if (*mp).lockedsleep {
                        (*mp).lockedsleep = false;
                        sl.nmidlelocked -= 1;
                        notewakeup(self.platform, &(*mp).park);
                    }
                }
            }
        }
    }
}

impl GQueue {
    pub(crate) const fn new() -> Self {
        GQueue {
            head: null_mut(),
            tail: null_mut(),
            size: 0,
        }
    }
}

impl Drop for Sched {
    fn drop(&mut self) {
        // Every M thread holds a reference until it is done, so nothing
        // runs on these any more.
        for &mp in self.allm.get_mut().iter() {
            // SAFETY: made by Box::into_raw in newm; its thread is gone.
            drop(unsafe { Box::from_raw(mp) });
        }
        // SAFETY: every M is gone (above); the Gs are this scheduler's.
        unsafe { crate::teardown::release_gs(self.allgs.get_mut()) };
        for &pp in &self.allp {
            // SAFETY: made by Box::into_raw in Sched::new.
            drop(unsafe { Box::from_raw(pp) });
        }
    }
}
