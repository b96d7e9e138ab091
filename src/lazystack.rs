//! A goroutine gets its stack when it first runs.
//!
//! Go keeps dead Gs on two free lists, `gFree.stack` and `gFree.noStack`,
//! and gives every new G a stack at spawn. gokernel goes one step further:
//! a spawn that finds no dead G with a stack (the P's `gfree`, refilled
//! from the global one) makes a G *without* one — taken from the
//! no-stack lists here, or allocated — and records only its closure. The
//! stack comes when an M first switches to it:
//!
//! 1. `execute` does `gogo(&g.sched)` as for any G. A stackless G's
//!    `sched` has `g` null and `pc =` `stackget_m`: behind the null
//!    check every `gogo` makes anyway, `gogo` then jumps to
//!    `stackget_m(g)` on the stack it was called on (g0's), TLS g still
//!    g0. `execute` and the switch path pay nothing for this, and the
//!    stack pointer never leaves a valid stack (a signal may arrive at any
//!    instruction).
//! 2. `stackget_m`, on g0, takes the stack of a dead G from the P's free
//!    list (or the global one; Go's `gfget` with a stack) — the donor,
//!    now stackless, goes on the P's no-stack list — or, if there is
//!    none, allocates a new one (`Sched::stackalloc_g`). It builds the
//!    first frame there (`proc::gostartframe`) and
//!    `gogo`s to it: from here on the G is like any other.
//!
//! So a burst of goroutines that run one at a time (spawned by a loop
//! that parks only at the end, on one P) needs about as many stacks as
//! run at once, not one per goroutine; a goroutine waiting to run costs
//! its G and its closure. A stack that cannot be allocated at the first
//! run is a fatal error naming the goroutine and its spawn site
//! (`docs/failures.md`); the spawn APIs that return
//! [`StackError`] (`try_spawn`, [`Sched::go`], the locked and per-CPU
//! spawns) allocate at the spawn instead (`lazy == false` in
//! `proc::newproc1`).
//!
//! Who sees a stackless G: dumps list it as `runnable, not started`;
//! `G::stack` is `[0, 0)` and `G::stackmem` is `None` (the overflow
//! classifier, preemption's safe-point check and the stall detector see
//! no stack, as for a g0); dropping the scheduler frees it like a dead G;
//! a bound-mode G is bound by `execute` before this runs, so it stays
//! where it got its stack.

use core::ptr::null_mut;

use crate::bound::{gqueue_pop, gqueue_push};
use crate::proc::{gfget, gfree_pop, gostartcall as gostartcall_stack, gostartfn, gostartframe};
use crate::runtime2::{G, P, Sched, SchedLocked, Stack, status};
use crate::stack::StackError;

/// How many stackless Gs a P keeps before it moves half to the global
/// list (as `gfput` does for Gs with stacks, which keeps 64: a G without
/// a stack is a few hundred bytes, not 32 KiB, and a burst of up to this
/// many then needs no lock).
pub const NOSTACK_LOCAL_MAX: u32 = 1024;

/// A G with no stack and nothing to run, for [`newproc1`](crate::proc::newproc1)
/// when no dead G with a stack is at hand: one from the no-stack lists, or
/// a new one (in `allgs`, belonging to `sched`). Without `lazy` it gets a
/// stack now; if that fails the G goes back on a list and the error is
/// returned. `pp`: the caller's P (owner), or null.
#[inline(always)]
pub(crate) fn newg(sched: &Sched, pp: *mut P, lazy: bool) -> Result<*mut G, StackError> {
    // SAFETY: pp is the caller's P: its lists are ours.
    unsafe {
        if lazy && !pp.is_null() && !(*pp).gfree_nostack.is_null() {
            let gp = (*pp).gfree_nostack;
            (*pp).gfree_nostack = (*gp).schedlink;
            (*pp).gfree_nostackcnt -= 1;
            (*gp).schedlink = null_mut();
            return Ok(gp);
        }
    }
    newg_slow(sched, pp, lazy)
}

/// [`newg`] when the P has no stackless G at hand (or one is wanted with a
/// stack).
#[inline(never)]
fn newg_slow(sched: &Sched, pp: *mut P, lazy: bool) -> Result<*mut G, StackError> {
    let mut gp = nostack_get(sched, pp);
    if gp.is_null() {
        let mut g = crate::proc::newg_struct(Stack { lo: 0, hi: 0 }, None);
        g.rt = sched;
        gp = crate::gslab::galloc(&sched.allgs, g);
    }
    if !lazy {
        match sched.stackalloc_g() {
            // SAFETY: gp is ours alone (taken off a list or new).
            Ok(mem) => unsafe {
                (*gp).stack = mem.bounds();
                (*gp).stackmem = Some(mem);
            },
            Err(e) => {
                nostack_put(sched, pp, gp);
                return Err(e);
            }
        }
    }
    Ok(gp)
}

/// [`gostartcall`](crate::proc::gostartcall) for a G from [`newg`]: one
/// with no stack (`lazy`) gets one from [`stackget_m`] when `gogo` first
/// takes it.
///
/// # Safety
///
/// `gp` is from [`newg`] with the same `lazy`, and nobody else refers to
/// it.
#[inline(always)]
pub(crate) unsafe fn gostartcall<F: FnOnce() + Send + 'static>(gp: *mut G, f: F, lazy: bool) {
    // SAFETY: the contract.
    unsafe {
        debug_assert_eq!(
            (*gp).stack.hi == 0,
            lazy,
            "newg gave a G a stack iff not lazy"
        );
        if !lazy {
            gostartcall_stack(gp, f);
            return;
        }
        gostartfn(gp, f);
        // What gogo recognises as a G without a stack (see the module docs).
        (*gp).sched.g = null_mut();
        (*gp).sched.sp = 0;
        (*gp).sched.pc = stackget_m as *const () as usize;
        (*gp)
            .atomicstatus
            .store(status::RUNNABLE, core::sync::atomic::Ordering::Release);
    }
}

/// On g0, at a stackless G's first run (jumped to by
/// [`gogo`](crate::asm_amd64::gogo) from `execute`, which made `gp` the
/// M's running G): gives `gp` a stack — a dead G's, or a new one — builds
/// its first frame and `gogo`s to it. A stack that cannot be allocated is
/// fatal, naming the goroutine and its spawn site.
///
/// # Safety
///
/// Only `gogo` enters it, for a G prepared by [`gostartcall`] that
/// `execute` is starting on this M.
pub(crate) unsafe extern "C" fn stackget_m(gp: *mut G) -> ! {
    // SAFETY: the contract: gp is this M's curg, RUNNING, without frames;
    // its M holds pp (or none), whose lists are ours.
    unsafe {
        let pp = (*(*gp).m).p;
        // The common case, inline: a dead G on the P's own list (gfget's
        // fast path), such as the one that just exited here.
        let donor = if pp.is_null() {
            null_mut()
        } else {
            (*pp).gfree
        };
        if donor.is_null() {
            stackget_slow(gp, pp);
        } else {
            (*pp).gfree = (*donor).schedlink;
            (*pp).gfreecnt -= 1;
            take_stack(gp, donor);
            nostack_put(&*(*gp).rt, pp, donor);
        }
        gostartframe(gp);
        (*gp).sched.g = gp;
        crate::asm_amd64::gogo(&(*gp).sched)
    }
}

/// Moves dead `donor`'s stack to `gp`, which has none: its guard, its
/// valgrind registration and its pool slot go with the `StackMem`.
///
/// # Safety
///
/// Both are ours alone; `gp` has no stack, `donor` has one.
#[inline(always)]
unsafe fn take_stack(gp: *mut G, donor: *mut G) {
    // SAFETY: the contract; gp.stackmem is None, so writing over it drops
    // nothing.
    unsafe {
        (*gp).stack = (*donor).stack;
        core::ptr::write(&raw mut (*gp).stackmem, (*donor).stackmem.take());
        (*donor).stack = Stack { lo: 0, hi: 0 };
    }
}

/// [`stackget_m`] when the P has no dead G at hand: one from the global
/// list (refilling the P's), or a new stack; fatal if none can be had.
///
/// # Safety
///
/// As [`stackget_m`]; `pp` is `gp`'s M's P, or null.
#[inline(never)]
unsafe fn stackget_slow(gp: *mut G, pp: *mut P) {
    // SAFETY: the contract.
    unsafe {
        let sched = &*(*gp).rt;
        let donor = if pp.is_null() {
            gfree_pop(&mut sched.lock.lock())
        } else {
            gfget(sched, pp)
        };
        if donor.is_null() {
            match sched.stackalloc_g() {
                Ok(mem) => {
                    (*gp).stack = mem.bounds();
                    core::ptr::write(&raw mut (*gp).stackmem, Some(mem));
                }
                Err(e) => nostack_fatal(gp, &e),
            }
        } else {
            take_stack(gp, donor);
            nostack_put(sched, pp, donor);
        }
    }
}

/// The fatal error of a goroutine that cannot get a stack at its first
/// run: `cannot start goroutine N (created at FILE:LINE:COL): <the
/// StackError>`, then the usual `(goroutine N on m M)`.
#[cold]
fn nostack_fatal(gp: *mut G, e: &StackError) -> ! {
    use core::fmt::Write;
    let mut msg: heapless::String<512> = heapless::String::new();
    // SAFETY: gp is live (the caller's running G).
    let (goid, site) = unsafe { ((*gp).goid(), (*gp).spawn_site()) };
    let _ = write!(msg, "cannot start goroutine {goid}");
    if let Some(site) = site {
        let _ = write!(msg, " (created at {site})");
    }
    let _ = write!(msg, ": no stack for its first run: {e}");
    crate::panic::throw_g(&msg, gp)
}

/// A stackless dead G off `pp`'s no-stack list, refilled from the global
/// one when empty; null if there is none. Owner of `pp` only.
fn nostack_get(sched: &Sched, pp: *mut P) -> *mut G {
    if pp.is_null() {
        return nostack_pop(&mut sched.lock.lock());
    }
    // SAFETY: pp is the caller's P; the global list is under the lock.
    unsafe {
        if (*pp).gfree_nostack.is_null() {
            let mut sl = sched.lock.lock();
            while (*pp).gfree_nostackcnt < NOSTACK_LOCAL_MAX / 2 {
                let g = nostack_pop(&mut sl);
                if g.is_null() {
                    break;
                }
                (*g).schedlink = (*pp).gfree_nostack;
                (*pp).gfree_nostack = g;
                (*pp).gfree_nostackcnt += 1;
            }
        }
        let gp = (*pp).gfree_nostack;
        if !gp.is_null() {
            (*pp).gfree_nostack = (*gp).schedlink;
            (*pp).gfree_nostackcnt -= 1;
            (*gp).schedlink = null_mut();
        }
        gp
    }
}

/// Puts a dead G that has no stack on `pp`'s no-stack list (moving half
/// to the global one when long), or on the global one when `pp` is null.
/// Owner of `pp` only.
#[inline(always)]
pub(crate) fn nostack_put(sched: &Sched, pp: *mut P, gp: *mut G) {
    // SAFETY: gp is dead and ours; pp is the caller's P.
    unsafe {
        debug_assert!((*gp).stackmem.is_none(), "nostack_put of a G with a stack");
        if pp.is_null() {
            gqueue_push(&mut sched.lock.lock().gfree_nostack, gp);
            return;
        }
        (*gp).schedlink = (*pp).gfree_nostack;
        (*pp).gfree_nostack = gp;
        (*pp).gfree_nostackcnt += 1;
        if (*pp).gfree_nostackcnt >= NOSTACK_LOCAL_MAX {
            nostack_spill(sched, pp);
        }
    }
}

/// Moves half of `pp`'s stackless Gs to the global list. Owner of `pp`.
#[inline(never)]
fn nostack_spill(sched: &Sched, pp: *mut P) {
    // SAFETY: pp is the caller's P; the global list is under the lock.
    unsafe {
        {
            let mut sl = sched.lock.lock();
            while (*pp).gfree_nostackcnt > NOSTACK_LOCAL_MAX / 2 {
                let g = (*pp).gfree_nostack;
                (*pp).gfree_nostack = (*g).schedlink;
                (*pp).gfree_nostackcnt -= 1;
                gqueue_push(&mut sl.gfree_nostack, g);
            }
        }
    }
}

/// How many stackless dead Gs on the global list sat unused through the
/// whole interval since the last trim, beyond `keep`, at most `max`; the
/// low-water mark starts a new interval ([`gftrim`](crate::proc::gftrim),
/// under the lock, as for the Gs with stacks).
pub(crate) fn nostack_cold(sl: &mut SchedLocked, keep: usize, max: usize) -> usize {
    let q = &sl.gfree_nostack;
    let cold = sl
        .gfree_nostack_low
        .min(q.size)
        .saturating_sub(keep)
        .min(max);
    sl.gfree_nostack_low = q.size - cold;
    cold
}

/// Frees `n` stackless dead Gs off the global list (fewer if it has
/// fewer), 256 per hold of the lock: [`gftrim`](crate::proc::gftrim)'s
/// share, off every hot path. A G without a stack costs only itself, but
/// a burst of a million spawned goroutines leaves a million.
pub(crate) fn nostack_trim(sched: &Sched, mut n: usize) {
    while n > 0 {
        let mut batch: heapless::Vec<*mut G, 256> = heapless::Vec::new();
        {
            let mut sl = sched.lock.lock();
            while n > 0 && !batch.is_full() {
                let g = nostack_pop(&mut sl);
                if g.is_null() {
                    n = 0;
                    break;
                }
                let _ = batch.push(g);
                n -= 1;
            }
        }
        if batch.is_empty() {
            return;
        }
        crate::proc::gfree_release(sched, &batch);
    }
}

/// A G off the global no-stack list, keeping its low-water mark.
pub(crate) fn nostack_pop(sl: &mut SchedLocked) -> *mut G {
    let g = gqueue_pop(&mut sl.gfree_nostack);
    sl.gfree_nostack_low = sl.gfree_nostack_low.min(sl.gfree_nostack.size);
    g
}
