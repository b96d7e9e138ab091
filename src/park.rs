//! Park / unpark: a token per G, as std::thread's ([`Parker`]: the
//! goroutine half of `gokernel::park`, `Goroutine::unpark` and joins).
//! Go's runtime has no such token; it is built on [`gopark`] and
//! [`goready`] like any other blocking primitive here.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::proc::{current_user_g, gopark, goready};
use crate::runtime2::{G, Sched, WaitReason};
use crate::tls::getg;

const PARK_EMPTY: u32 = 0;
const PARK_NOTIFIED: u32 = 1;
const PARK_PARKED: u32 = 2;

/// The park token of one G, shared with its handles (std::thread's
/// semantics: an `unpark` before `park` is kept, not lost).
pub struct Parker {
    /// `PARK_EMPTY`, `PARK_NOTIFIED` or `PARK_PARKED`.
    state: AtomicU32,
    /// The G; only followed while `state` is `PARK_PARKED`, which implies
    /// the G is alive and parked.
    gp: AtomicPtr<G>,
    /// The G's scheduler. Weak: a handle may outlive the runtime, and then
    /// `unpark` has nothing to wake (the runtime freed its Gs).
    rt: alloc::sync::Weak<Sched>,
}

impl Parker {
    /// The parker of the current G, made on first use.
    ///
    /// # Safety
    ///
    /// On a user G of a scheduler.
    pub unsafe fn current() -> Arc<Parker> {
        // SAFETY: the contract.
        unsafe { Self::current_ref() }.clone()
    }

    /// The parker of the current G, borrowed: what `park` needs, without
    /// the `Arc` clone and drop (two locked instructions) of
    /// [`current`](Self::current).
    ///
    /// # Safety
    ///
    /// On a user G of a scheduler; the borrow must end before the G
    /// exits (only the G itself and, after it is done, `goexit0` touch
    /// its parker field).
    pub(crate) unsafe fn current_ref<'a>() -> &'a Arc<Parker> {
        let gp = getg();
        // SAFETY: the contract: gp is the running G; only it touches its
        // own parker field (and goexit0 after it is done).
        unsafe {
            (*gp).parker.get_or_insert_with(|| {
                Arc::new(Parker {
                    state: AtomicU32::new(PARK_EMPTY),
                    gp: AtomicPtr::new(gp),
                    rt: (*(*gp).rt).self_weak.clone(),
                })
            })
        }
    }

    /// A parker of its own for the current G, apart from the G's park
    /// token (which `current` gives): for a wait inside the runtime
    /// (`JoinHandle::join`) that must not consume or leave a token the
    /// program's `park` / `unpark` use.
    ///
    /// # Safety
    ///
    /// On a user G of a scheduler; only that G parks on it.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn new_for_current() -> Arc<Parker> {
        let gp = getg();
        Arc::new(Parker {
            state: AtomicU32::new(PARK_EMPTY),
            gp: AtomicPtr::new(gp),
            // SAFETY: the contract: gp is a running user G, so its
            // scheduler is live.
            rt: unsafe { (*(*gp).rt).self_weak.clone() },
        })
    }

    /// Blocks the current G until its token is available, then consumes
    /// it. The parker must be the current G's.
    ///
    /// # Safety
    ///
    /// On the G this parker belongs to.
    pub unsafe fn park(&self) {
        // SAFETY: the contract is the same.
        unsafe { self.park_for(WaitReason::Park) }
    }

    /// [`park`](Self::park), recording `reason` as the wait's.
    ///
    /// # Safety
    ///
    /// As [`park`](Self::park).
    pub(crate) unsafe fn park_for(&self, reason: WaitReason) {
        while !self.take_token() {
            // SAFETY: on this parker's G (the contract); park_commit only
            // reads the parker, which outlives the call.
            unsafe { gopark(park_commit, self as *const Parker as *mut (), reason) };
        }
    }

    /// Consumes the token if it is there.
    fn take_token(&self) -> bool {
        // A load first: on the way into a park the token is usually not
        // there, and a failing CAS still locks the bus. Only this G moves
        // the state away from NOTIFIED, so a NOTIFIED seen here stays
        // until the CAS below; the CAS (not a plain store of EMPTY) is
        // still needed, because an unparker may swap NOTIFIED over
        // NOTIFIED in between, and its release must be acquired here too
        // (the CAS reads the last value in the state's modification
        // order; a store would lose that unparker's writes and token).
        // Acquire: pairs with unpark's release, so what the unparker did
        // before is visible after.
        self.state.load(Ordering::Relaxed) == PARK_NOTIFIED
            && self
                .state
                .compare_exchange(
                    PARK_NOTIFIED,
                    PARK_EMPTY,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Makes the token available, waking the G if it is parked.
    pub fn unpark(&self) {
        // AcqRel: release publishes our writes to the woken G; acquire
        // pairs with park_commit's release, so gp's parked state is seen.
        if self.state.swap(PARK_NOTIFIED, Ordering::AcqRel) != PARK_PARKED {
            return;
        }
        let gp = self.gp.load(Ordering::Relaxed);
        // On a goroutine of the G's own scheduler, that scheduler is alive
        // (it outlives every M running its Gs, and we run on one): no
        // `Weak::upgrade` and drop, two locked instructions per wake-up.
        let me = current_user_g();
        // SAFETY: a user G's M and scheduler are live (current_user_g).
        if !me.is_null() && unsafe { (*(*me).m).rt } == self.rt.as_ptr() {
            // SAFETY: PARKED means the G is parked in `park` and the swap
            // made us its one waker; its scheduler, which owns its
            // memory, is the one running us.
            unsafe { goready(gp) };
            return;
        }
        // Elsewhere, holding the scheduler keeps the parked G's memory
        // alive while we ready it; if the runtime is gone, so is the G,
        // and there is nothing to wake.
        let Some(sched) = self.rt.upgrade() else {
            return;
        };
        // SAFETY: PARKED means the G is parked in `park`, the swap made us
        // its one waker, and its scheduler (which owns its memory) is held.
        unsafe { crate::sema::ready_outside::<true>(&sched, gp) };
        drop(sched);
    }
}

/// `gopark`'s unlock function for [`Parker::park`]: commits to sleeping
/// unless a token arrived meanwhile.
///
/// # Safety
///
/// `arg` is a live `Parker` of `_gp`.
unsafe fn park_commit(_gp: *mut G, arg: *mut ()) -> bool {
    // SAFETY: the contract.
    let p = unsafe { &*(arg as *const Parker) };
    // Release: the G's saved context happens before an unparker that sees
    // PARKED readies it.
    p.state
        .compare_exchange(PARK_EMPTY, PARK_PARKED, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}
