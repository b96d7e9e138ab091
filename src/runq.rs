//! A P's local run queue: a ring of [`RUNQ_LEN`] slots plus the `runnext`
//! slot (Go's `runqput`, `runqget`, `runqgrab`, `runqsteal`, `runqempty`
//! from `proc.go`).
//!
//! One owner (the M holding the P) puts and gets; any other M may steal.
//! The owner writes slots at `tail` and publishes them by advancing `tail`;
//! getters and thieves claim slots at `head` with a compare-and-swap.
//!
//! Go reads a victim's slots before the CAS that commits a steal; when the
//! CAS fails the values are thrown away. In Rust a plain read racing the
//! owner's write would be a data race (undefined behaviour) even if the
//! value is discarded, so every slot is an atomic pointer. Slot accesses are
//! `Relaxed`: the `head` / `tail` operations around them carry the
//! ordering, as each comment says.
//!
//! The queue holds opaque pointers and never dereferences them, so it is
//! generic over the pointee; the runtime uses `Runq<G>`. Under `cfg(loom)`
//! the atomics are loom's and the ring has 4 slots, so the model checker in
//! `tests/loom_runq.rs` can explore every interleaving.

#[cfg(not(loom))]
use core::sync::atomic::{AtomicPtr, AtomicU32};
#[cfg(loom)]
use loom::sync::atomic::{AtomicPtr, AtomicU32};

use core::ptr;
use core::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

/// Slots in a P's ring (Go: `len(p.runq)`, 256).
#[cfg(not(loom))]
pub const RUNQ_LEN: usize = 256;
/// Slots in a P's ring: 4 under loom, so the state space stays small.
#[cfg(loom)]
pub const RUNQ_LEN: usize = 4;

const LEN: u32 = RUNQ_LEN as u32;
static_assertions::const_assert!(RUNQ_LEN.is_power_of_two());

/// The most `runqputslow` moves to the global queue at once: half the ring
/// plus the G being put.
pub const RUNQ_BATCH: usize = RUNQ_LEN / 2 + 1;

/// A batch moved off a full ring, oldest first, for the global queue.
pub type Overflow<T> = heapless::Vec<*mut T, RUNQ_BATCH>;

/// A P's run queue.
pub struct Runq<T> {
    /// Next slot to take. Written by the owner's `runqget` and by thieves,
    /// always with a CAS.
    head: AtomicU32,
    /// Next slot to fill. Written only by the owner.
    tail: AtomicU32,
    /// A G to run next, ahead of the ring (Go's `runnext`). The owner swaps
    /// it; thieves and the owner take it with a CAS.
    runnext: AtomicPtr<T>,
    /// The ring. Slot `i % RUNQ_LEN` for `head <= i < tail` holds a G.
    slots: [AtomicPtr<T>; RUNQ_LEN],
}

// SAFETY: the queue only stores and hands back pointers; every access to
// its state is atomic, and what the pointers mean is the caller's business.
unsafe impl<T> Send for Runq<T> {}
// SAFETY: as above: all shared state is in atomics.
unsafe impl<T> Sync for Runq<T> {}

impl<T> Default for Runq<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Runq<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Runq {
            head: AtomicU32::new(0),
            tail: AtomicU32::new(0),
            runnext: AtomicPtr::new(ptr::null_mut()),
            slots: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        }
    }

    fn slot(&self, i: u32) -> &AtomicPtr<T> {
        &self.slots[(i % LEN) as usize]
    }

    /// Gs in the ring plus `runnext`, as seen now (may be stale at once).
    pub fn len(&self) -> usize {
        let (h, t) = self.head_tail();
        let n = t.wrapping_sub(h).min(LEN) as usize;
        n + usize::from(!self.runnext.load(Acquire).is_null())
    }

    /// The ring's length as its owner sees it, for statistics: two relaxed
    /// loads, no retry (a thief may be moving head meanwhile; the result is
    /// then a little high, never above the ring's size).
    pub fn len_owner(&self) -> usize {
        let t = self.tail.load(Relaxed);
        let h = self.head.load(Relaxed);
        t.wrapping_sub(h).min(LEN) as usize
    }

    /// True if [`len`](Self::len) is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A consistent (head, tail) pair: tail re-read until head did not move
    /// in between, so `tail - head` is never an artefact of a torn read.
    fn head_tail(&self) -> (u32, u32) {
        loop {
            // Acquire both: pairs with the releases that advance them.
            let h = self.head.load(Acquire);
            let t = self.tail.load(Acquire);
            if self.head.load(Acquire) == h {
                return (h, t);
            }
        }
    }
}

/// Reports whether `q` has no Gs (Go's `runqempty`). It may say "empty"
/// only if the queue really was empty at one instant: a G moving from
/// `runnext` to the ring (or back) is never missed.
pub fn runqempty<T>(q: &Runq<T>) -> bool {
    // Go's argument: read head, tail, runnext, then tail again; if tail
    // did not change, no put raced us, so a G cannot have slipped between
    // runnext and the ring unseen.
    loop {
        let h = q.head.load(Acquire); // pairs with the CAS that advances head
        let t = q.tail.load(Acquire); // pairs with the release in runqput
        let next = q.runnext.load(Acquire); // pairs with the swap in runqput
        if q.tail.load(Acquire) == t {
            return h == t && next.is_null();
        }
    }
}

/// Whether some P of `sched` has a G queued, as seen now (the look of
/// Go's `checkRunqsNoP`, without the taking): what an M that just idled
/// its P looks at before it sleeps.
pub(crate) fn runqs_queued(sched: &crate::runtime2::Sched) -> bool {
    // SAFETY: a scheduler's Ps live as long as it; only their queues
    // (atomics) are read.
    sched
        .allp
        .iter()
        .any(|&pp| !runqempty(unsafe { &(*pp).runq }))
}

/// Puts `gp` on `q` (Go's `runqput`). With `next`, `gp` goes into
/// `runnext` and the G it displaces, if any, goes to the ring's tail.
/// When the ring is full, half of it plus that G are returned, oldest
/// first, for the caller to put on the global queue.
///
/// Only the owner of `q` may call it.
pub fn runqput<T>(q: &Runq<T>, gp: *mut T, next: bool) -> Option<Overflow<T>> {
    let mut gp = gp;
    if next {
        // Release publishes gp's state to whoever takes runnext; acquire
        // pairs with the put that stored the displaced G. SeqCst (the same
        // `xchg` on x86_64): the caller's check for an idle P that follows
        // (`wakep_needed_after_put`) needs no fence of its own, since this
        // swap is in the SeqCst order before its loads (see there).
        let old = q.runnext.swap(gp, SeqCst);
        if old.is_null() {
            return None;
        }
        gp = old; // kick the old runnext to the ring
    }
    loop {
        // Acquire: pairs with the release CAS of getters and thieves, so
        // their reads of the slots we may now overwrite happened before.
        let h = q.head.load(Acquire);
        let t = q.tail.load(Relaxed); // only we write tail
        if t.wrapping_sub(h) < LEN {
            q.slot(t).store(gp, Relaxed);
            // Release: publishes the slot (and gp's state) to consumers that
            // acquire tail.
            q.tail.store(t.wrapping_add(1), Release);
            return None;
        }
        if let Some(batch) = runqputslow(q, gp, h, t) {
            return Some(batch);
        }
        // A thief or getter moved head: there is room now; retry.
    }
}

/// Takes half of a full ring plus `gp` as a batch for the global queue
/// (Go's `runqputslow`). `None` if head moved under us.
fn runqputslow<T>(q: &Runq<T>, gp: *mut T, h: u32, t: u32) -> Option<Overflow<T>> {
    let n = t.wrapping_sub(h) / 2;
    debug_assert_eq!(n, LEN / 2, "runqputslow: queue is not full");
    let mut batch = Overflow::new();
    for i in 0..n {
        // Relaxed: we own these slots' contents once the CAS below succeeds;
        // if it fails the values are discarded.
        let _ = batch.push(q.slot(h.wrapping_add(i)).load(Relaxed));
    }
    // Release: our slot reads happen before anyone reuses the slots; a
    // failed CAS means a consumer claimed some of them first.
    if q.head
        .compare_exchange(h, h.wrapping_add(n), Release, Relaxed)
        .is_err()
    {
        return None;
    }
    let _ = batch.push(gp);
    Some(batch)
}

/// Takes a G from `q` (Go's `runqget`): `runnext` first, then the ring's
/// head. The flag is true for `runnext`: that G inherits the current time
/// slice instead of starting a new one.
///
/// Only the owner of `q` may call it.
#[inline(always)]
pub fn runqget<T>(q: &Runq<T>) -> Option<(*mut T, bool)> {
    let next = q.runnext.load(Acquire);
    // AcqRel on success. Acquire pairs with the release swap that stored
    // it. Release matters to `runqempty`: an observer that reads the null
    // we store must also see every earlier tail store of ours, or it could
    // read an old tail and miss a G that `runqput` kicked from runnext to
    // the ring (found by loom: tests/loom_runq.rs).
    if !next.is_null()
        && q.runnext
            .compare_exchange(next, ptr::null_mut(), AcqRel, Relaxed)
            .is_ok()
    {
        return Some((next, true));
    }
    loop {
        // Acquire: pairs with thieves' release CAS on head.
        let h = q.head.load(Acquire);
        let t = q.tail.load(Relaxed); // only we write tail
        if t == h {
            return None;
        }
        let gp = q.slot(h).load(Relaxed);
        // Release: our read of the slot happens before the owner (us) or
        // anyone reuses it; the slot's contents were published by our own
        // earlier tail store.
        if q.head
            .compare_exchange(h, h.wrapping_add(1), Release, Relaxed)
            .is_ok()
        {
            return Some((gp, false));
        }
    }
}

/// Moves about half of `q`'s Gs into `batch`'s ring, starting at slot
/// `batch_head`, without publishing them (Go's `runqgrab`). With
/// `steal_runnext`, an otherwise empty `q` gives up its `runnext`.
/// Returns how many were moved.
///
/// Any M may call it on any `q`; `batch` must be the caller's own queue.
pub fn runqgrab<T>(q: &Runq<T>, batch: &Runq<T>, batch_head: u32, steal_runnext: bool) -> u32 {
    loop {
        // Acquire head: pairs with other consumers' release CAS.
        let h = q.head.load(Acquire);
        // Acquire tail: pairs with the owner's release store, so the slots
        // below tail are visible.
        let t = q.tail.load(Acquire);
        let n = t.wrapping_sub(h);
        let n = n - n / 2;
        if n == 0 {
            if steal_runnext {
                let next = q.runnext.load(Acquire);
                // AcqRel on success: acquire pairs with the owner's release
                // swap; release keeps `runqempty` observers that read our
                // null from reading an older tail (as in runqget).
                if !next.is_null()
                    && q.runnext
                        .compare_exchange(next, ptr::null_mut(), AcqRel, Relaxed)
                        .is_ok()
                {
                    batch.slot(batch_head).store(next, Relaxed);
                    return 1;
                }
            }
            return 0;
        }
        if n > LEN / 2 {
            // h and t were read at different times: inconsistent, retry.
            continue;
        }
        for i in 0..n {
            // Relaxed: see runqputslow; discarded if the CAS fails.
            let gp = q.slot(h.wrapping_add(i)).load(Relaxed);
            batch.slot(batch_head.wrapping_add(i)).store(gp, Relaxed);
        }
        // Release: our reads of the slots happen before the owner refills
        // them (it acquires head before writing).
        if q.head
            .compare_exchange(h, h.wrapping_add(n), Release, Relaxed)
            .is_ok()
        {
            return n;
        }
    }
}

/// Steals about half of `victim`'s Gs into `q` and returns one of them to
/// run (Go's `runqsteal`).
///
/// Only the owner of `q` may call it.
pub fn runqsteal<T>(q: &Runq<T>, victim: &Runq<T>, steal_runnext: bool) -> Option<*mut T> {
    let t = q.tail.load(Relaxed); // only we write our tail
    let n = runqgrab(victim, q, t, steal_runnext);
    if n == 0 {
        return None;
    }
    let n = n - 1;
    let gp = q.slot(t.wrapping_add(n)).load(Relaxed);
    if n == 0 {
        return Some(gp);
    }
    let h = q.head.load(Acquire);
    debug_assert!(
        t.wrapping_sub(h).wrapping_add(n) < LEN,
        "runqsteal: runq overflow"
    );
    // Release: publishes the stolen slots to our own consumers and thieves.
    q.tail.store(t.wrapping_add(n), Release);
    Some(gp)
}

/// Moves `runnext`, if set, to the ring's tail, so the ring's head runs
/// first. Returns the overflow batch as [`runqput`] does. The scheduler
/// uses it to bound how long Gs handing `runnext` to each other can keep
/// the rest of the queue waiting (gokernel has no preemption).
///
/// Only the owner of `q` may call it.
pub fn runqdemote<T>(q: &Runq<T>) -> Option<Overflow<T>> {
    let next = q.runnext.load(Acquire);
    // AcqRel on success, as in runqget; a thief may have taken it first,
    // and then there is nothing to do.
    if next.is_null()
        || q.runnext
            .compare_exchange(next, ptr::null_mut(), AcqRel, Relaxed)
            .is_err()
    {
        return None;
    }
    runqput(q, next, false)
}
