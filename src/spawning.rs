//! Threads holding no P that are starting a goroutine: `checkdead` takes
//! them for running Ms.
//!
//! Go's `checkdead` reports a deadlock only when no M runs (`mcount() -
//! nmidle - nmidlelocked - nmsys` is zero), and only a running M starts a
//! goroutine. Here `checkdead` looks at the Ps instead (every P idle), and
//! a thread that holds none starts goroutines too: `Runtime::block_on`'s
//! caller, `Sched::go` from a plain thread, a g0 without a P (a deadlock
//! hook). `newproc1` counts the new G in `ngoroutines` before that thread
//! puts it on the global queue, so a `checkdead` in between saw a live G,
//! every P idle and nothing queued: a deadlock. `block_on` then returned
//! `Err(Deadlock)` with its main goroutine runnable and never started (a
//! state dump at the report: that G `RUNNABLE` on no queue, both Ps idle;
//! the M reporting had just idled its P as the previous main goroutine
//! exited, while the next `block_on` was spawning; the spawner waits for
//! the scheduler lock that `checkdead` holds, which widens the window).
//!
//! Such a thread counts in `Sched::nspawning` from before the G exists
//! until it is where `checkdead` looks (the global queue, or an M's locked
//! G), and `checkdead` reports nothing while the count is not zero.
//!
//! # Why a check cannot miss the G, or miss a deadlock
//!
//! - The starter increments the count (SeqCst), then a release fence, then
//!   `newproc1` adds the G to `ngoroutines` (Relaxed, an RMW). A
//!   `checkdead` whose acquire load of `ngoroutines` counts the G (or any
//!   later RMW of it) synchronizes with that fence, so its later load of
//!   the count sees the increment, or the decrement; and the decrement is
//!   made under `Sched::lock` together with the put that makes the G
//!   visible ([`Spawning::end_locked`]), so a `checkdead`, which decides
//!   under that lock, sees the G queued or the count up.
//! - `checkdead` reads the count after taking the deadlock hooks' lock: a
//!   `block_on` that counts itself before adding its hook (and stops
//!   counting once its main goroutine is queued) cannot be told of a
//!   deadlock decided before it added the hook and before its main
//!   goroutine was queued, about goroutines that were parked before.
//! - A `checkdead` that saw the count up reported nothing: the starter
//!   that ends its count with every P idle and nothing queued (its G was
//!   not made, or ran and parked) wakes an M ([`Drop`]), which idles its P
//!   again and runs `checkdead` then (Go's `mput` runs `checkdead` as an M
//!   stops running, for the same reason).

use core::sync::atomic::{Ordering, fence};

use crate::runtime2::{Sched, SchedLocked};

/// One count in `Sched::nspawning`, held by a thread that holds no P while
/// it starts a goroutine (see the module docs).
pub(crate) struct Spawning<'a>(&'a Sched);

impl<'a> Spawning<'a> {
    /// Counts the calling thread as starting a goroutine of `sched`. Before
    /// `newproc1`, or before `Sched::add_deadlock_hook`.
    pub(crate) fn begin(sched: &'a Sched) -> Self {
        // SeqCst, then a release fence: `newproc1`'s relaxed increment of
        // ngoroutines that follows carries this one to checkdead's acquire
        // load (module docs).
        sched.nspawning.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::Release);
        Spawning(sched)
    }

    /// Ends the count under the lock `_sl` of the same scheduler, in the
    /// critical section that made the new G visible to `checkdead` (on the
    /// global queue, or on an idle M as its locked G).
    pub(crate) fn end_locked(self, _sl: &mut SchedLocked) {
        self.0.nspawning.fetch_sub(1, Ordering::SeqCst);
        core::mem::forget(self);
    }
}

impl Drop for Spawning<'_> {
    /// Ends the count outside a put (no G made, or one made visible
    /// already): if every P is idle and nothing is queued, a `checkdead`
    /// may have stood back for this count, so an M is woken to idle a P
    /// and look again. (Not `checkdead` here: this may be a deadlock hook,
    /// which runs under the hooks' lock that `checkdead` takes.)
    fn drop(&mut self) {
        let sched = self.0;
        let all_idle = {
            let sl = sched.lock.lock();
            sched.nspawning.fetch_sub(1, Ordering::SeqCst);
            sched.npidle.load(Ordering::SeqCst) as usize == sched.allp.len() && sl.runq.size == 0
        };
        if all_idle {
            crate::proc::wakep(sched);
        }
    }
}

/// Whether a thread is starting a goroutine of `sched`: `checkdead`'s
/// question, asked under the scheduler lock and the hooks' lock.
pub(crate) fn any(sched: &Sched) -> bool {
    sched.nspawning.load(Ordering::SeqCst) != 0
}
