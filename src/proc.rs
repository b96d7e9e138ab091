//! Ms and Gs: starting an M on its g0, making Gs, and a G's exit (Go's
//! `proc.go`: `mstart`, `malg`, `gostartcallfn`, `goexit1`, `goexit0`).

use alloc::boxed::Box;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memoffset::offset_of;

use crate::asm_amd64::{goexit, gogo, gostart, mcall, mstart1};
use crate::panic::throw_g;
use crate::runtime2::{FuncVal, G, Gobuf, M, Stack, status};
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

impl M {
    /// A new M with id `id` and a g0 that will run on the stack of the
    /// thread that calls [`mstart`] with it.
    pub fn new(id: i64) -> Box<M> {
        let g0 = Box::into_raw(Box::new(G {
            stack: Stack::default(),
            sched: Gobuf::new(),
            m: core::ptr::null_mut(),
            goid: 0,
            atomicstatus: AtomicU32::new(status::IDLE),
            startfv: FuncVal { fn_: gentry },
            startfn: None,
            stackmem: None,
        }));
        Box::new(M {
            g0,
            curg: core::ptr::null_mut(),
            gsignal: core::ptr::null_mut(),
            p: core::ptr::null_mut(),
            id,
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
pub fn malg(stack_size: usize) -> Result<Box<G>, StackError> {
    let mem = stackalloc(stack_size)?;
    let mut gp = Box::new(G {
        stack: mem.bounds(),
        sched: Gobuf::new(),
        m: core::ptr::null_mut(),
        goid: 0,
        atomicstatus: AtomicU32::new(status::IDLE),
        startfv: FuncVal { fn_: gentry },
        startfn: None,
        stackmem: Some(mem),
    });
    gp.sched.g = &raw mut *gp;
    Ok(gp)
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
pub unsafe fn gostartcallfn(gp: *mut G, f: Box<dyn FnOnce() + Send + 'static>) {
    // SAFETY: per the contract, nothing else touches gp or its stack.
    let g = unsafe { &mut *gp };
    if g.stack.hi == 0 || g.stack.hi - g.stack.lo < 64 {
        throw_g("gostartcallfn on a goroutine with no stack", gp);
    }
    let hi = g.stack.hi & !15;
    let sp = hi - 8;
    // SAFETY: sp lies inside the G's own, unused stack.
    unsafe { (sp as *mut usize).write(goexit as *const () as usize + 1) };
    g.startfv = FuncVal { fn_: gentry };
    g.startfn = Some(f);
    g.sched = Gobuf {
        sp,
        pc: gostart as *const () as usize,
        g: gp,
        ctxt: &raw mut g.startfv as usize,
        ..Gobuf::new()
    };
    g.atomicstatus.store(status::RUNNABLE, Ordering::Release);
}

/// The function every fresh G runs first (through `G.startfv`): takes the
/// G's closure and calls it.
///
/// # Safety
///
/// `fv` must be the `startfv` field of a live G; only [`gostart`] calls it.
unsafe extern "C" fn gentry(fv: *mut FuncVal) {
    let gp = fv.wrapping_byte_sub(offset_of!(G, startfv)).cast::<G>();
    // SAFETY: fv is &gp.startfv (the contract), so gp is the running G.
    let f = unsafe { (*gp).startfn.take() };
    let Some(f) = f else {
        throw_g("goroutine started without a function", gp)
    };
    run_catching(f, gp);
}

/// Runs a G's function. Unwinding cannot cross the entry trampoline, so a
/// panic that reaches here ends the process with a fatal error naming the
/// goroutine (the panic hook has already printed the message).
#[cfg(feature = "std")]
fn run_catching(f: Box<dyn FnOnce() + Send + 'static>, gp: *mut G) {
    if std::panic::catch_unwind(core::panic::AssertUnwindSafe(f)).is_err() {
        throw_g(
            "a goroutine panicked (message above); a panic cannot unwind out of a goroutine",
            gp,
        );
    }
}

/// Runs a G's function. Without `std` there is no unwinding to catch: a
/// panic goes to the embedder's panic handler.
#[cfg(not(feature = "std"))]
fn run_catching(f: Box<dyn FnOnce() + Send + 'static>, _gp: *mut G) {
    f()
}

/// Runs the calling thread as M `mp`: makes `mp.g0` the current G, records
/// `g0.sched` (once, in [`mstart1`]) and calls `f` on g0.
///
/// Returns when `f` returns, or when code on this M ends it with
/// `gogo(&g0.sched)` (as [`schedule`] does when there is nothing left to
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
        (*mp).curg = core::ptr::null_mut();
        setg(core::ptr::null_mut());
    }
}

/// Finishes the current G: called by [`goexit`] when a G's function
/// returns (Go's `goexit1`). Switches to g0 to run [`goexit0`].
pub(crate) extern "C" fn goexit1() -> ! {
    // SAFETY: we are on a user G (goexit is only reached from a fresh G's
    // function); goexit0 does not return.
    unsafe { mcall(goexit0) };
    throw_g("goexit: resumed a dead goroutine", getg())
}

/// On g0: the G `gp` has finished (Go's `goexit0`). It becomes dead, its
/// M forgets it, and the M goes to [`schedule`].
///
/// # Safety
///
/// Only [`mcall`] calls it, with the G that just finished.
unsafe extern "C" fn goexit0(gp: *mut G) {
    // SAFETY: gp is the G that was running on this M; it is now suspended
    // for good and only this M touches it.
    unsafe {
        (*gp).casstatus(status::RUNNING, status::DEAD);
        (*gp).startfn = None;
        let mp = (*gp).m;
        (*gp).m = core::ptr::null_mut();
        (*mp).curg = core::ptr::null_mut();
    }
    schedule()
}

/// On g0: find a runnable G and run it (Go's `schedule`).
///
/// The switch core has no run queues: an M whose G finished has nothing
/// left to run, so it ends, returning from [`mstart`].
pub fn schedule() -> ! {
    let g0 = getg();
    // SAFETY: schedule runs on g0, whose sched was set by mstart1 and whose
    // frame (mstart's) is still live while the M runs.
    unsafe { gogo(&(*g0).sched) }
}

/// Runs `gp` on the current M (Go's `execute`): makes it `m.curg`, marks
/// it running and jumps to it. Called on g0.
///
/// # Safety
///
/// The caller must be on g0 of the current M, and `gp` must be a runnable
/// G (fresh from [`gostartcallfn`] or suspended by [`mcall`]) that no
/// other M is running or about to run.
pub unsafe fn execute(gp: *mut G) -> ! {
    let g0 = getg();
    // SAFETY: we are on g0 (the contract), so g0.m is this M.
    unsafe {
        let mp = (*g0).m;
        debug_assert!((*mp).g0 == g0, "execute called off g0");
        (*mp).curg = gp;
        (*gp).m = mp;
        (*gp).casstatus(status::RUNNABLE, status::RUNNING);
        gogo(&(*gp).sched)
    }
}
