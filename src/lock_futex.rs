//! One-shot wake-up notes on futexes (Go's `lock_futex.go`: `notesleep`,
//! `notewakeup`, `noteclear`).
//!
//! An idle M sleeps on its note in `stopm`; `startm` wakes it. A wake-up
//! that comes before the sleep is not lost: the note stays set until
//! `noteclear`), and the kick of an idle M (`notekick`, for
//! [`crate::intr`] and [`crate::cpu`]).

use core::sync::atomic::{AtomicU32, Ordering};

use crate::platform::Platform;

/// Nobody woke the sleeper.
const CLEAR: u32 = 0;
/// `notewakeup` woke it: what the waker wrote before is for it.
const WOKEN: u32 = 1;
/// `notekick` woke it without handing it anything: it looks for work
/// that needs an M (see [`crate::cpu`]), and sleeps again if there is
/// none. A `notewakeup` may still follow and overrides it.
const KICKED: u32 = 2;

/// A note: [`CLEAR`], [`WOKEN`] or [`KICKED`].
#[derive(Default)]
pub struct Note {
    key: AtomicU32,
}

impl Note {
    /// A clear note.
    pub const fn new() -> Self {
        Note {
            key: AtomicU32::new(0),
        }
    }
}

/// Sleeps until `n` is woken (Go's `notesleep`). Returns at once if it
/// already was.
pub fn notesleep(p: &dyn Platform, n: &Note) {
    // Acquire: pairs with the release in notewakeup, so what the waker
    // wrote before waking (M.nextp) is visible.
    while n.key.load(Ordering::Acquire) == CLEAR {
        p.futexsleep(&n.key, CLEAR, None);
    }
}

/// Wakes the sleeper on `n`, or the next one to sleep (Go's `notewakeup`).
pub fn notewakeup(p: &dyn Platform, n: &Note) {
    // Release: publishes the waker's writes to the sleeper.
    let old = n.key.swap(WOKEN, Ordering::Release);
    if old == WOKEN {
        crate::panic::throw("notewakeup: double wakeup");
    }
    p.futexwakeup(&n.key, 1);
}

/// Clears `n` for reuse (Go's `noteclear`). Only its sleeper calls it,
/// after waking.
pub fn noteclear(n: &Note) {
    n.key.store(CLEAR, Ordering::Relaxed);
}

/// Makes the sleeper on `n` return from [`notesleep`] without waking it
/// for good: it finds the note [`notekicked`] and decides itself what to
/// do. False if the note was not clear (it is woken or kicked already,
/// and will look anyway). Lock-free: an interrupt handler may call it.
pub fn notekick(p: &dyn Platform, n: &Note) -> bool {
    // SeqCst: after the poster's publication of the work (see intr.rs).
    if n.key
        .compare_exchange(CLEAR, KICKED, Ordering::SeqCst, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    p.futexwakeup(&n.key, 1);
    true
}

/// After [`notesleep`] returned: whether it was a kick only. If so the
/// note is cleared for the next sleep (a `notewakeup` racing with this
/// wins: then this returns false and the note stays woken). Only the
/// sleeper calls it.
pub fn notekicked(n: &Note) -> bool {
    n.key
        .compare_exchange(KICKED, CLEAR, Ordering::Acquire, Ordering::Acquire)
        .is_ok()
}

// ---------------------------------------------------------------------
// The scheduler's lock (Go's `lock2` / `unlock2` on a futex).

/// Nobody holds the lock.
const MUTEX_UNLOCKED: u32 = 0;
/// Somebody does, and nobody sleeps waiting for it.
const MUTEX_LOCKED: u32 = 1;
/// Somebody does, and a waiter may sleep on the key (Go's
/// `mutex_sleeping`): the release must wake one.
const MUTEX_SLEEPING: u32 = 2;

/// Rounds of [`procyield`] a waiter spins before yielding its thread
/// (Go's `active_spin`), only with more than one CPU.
const ACTIVE_SPIN: u32 = 4;
/// `pause` instructions per round (Go's `active_spin_cnt`).
const ACTIVE_SPIN_CNT: u32 = 30;
/// Times a waiter yields its thread ([`Platform::osyield`]) before it
/// sleeps (Go's `passive_spin`).
const PASSIVE_SPIN: u32 = 1;

/// A mutual-exclusion lock whose waiters spin a little, then yield, then
/// sleep on a futex (Go's `lock2` / `unlock2` in `lock_futex.go`): a
/// holder that the OS preempts leaves its waiters asleep, not burning
/// their time slices as on a pure spin lock. The futex is the
/// [`Platform`]'s (`futexsleep` / `futexwakeup`), so the lock works on bare
/// metal too (a waiting CPU halts until the holder's IPI).
///
/// The key has Go's three states. Taking a free lock is one
/// compare-and-swap (`UNLOCKED` → `LOCKED`). A waiter that gives up
/// spinning swaps in `SLEEPING`: if the old value was `UNLOCKED` it has the
/// lock (marked `SLEEPING`, which at worst costs one needless wake-up
/// later), otherwise it sleeps on the key for as long as the key still
/// reads `SLEEPING`. The release swaps in `UNLOCKED` and wakes one sleeper
/// if the old value was `SLEEPING`. Both sides change the key with atomic
/// swaps, so one of them always sees the other: a waiter that marked the
/// key before the release is woken; one that marks it after finds the
/// lock free. No wake-up is missed, and no sleep needs a time-out. The
/// price is the release's swap: one locked operation per lock/unlock pair
/// more than a spin lock's plain store (a plain store cannot see a waiter
/// that marks the key between the holder's last look and its store).
pub(crate) struct Mutex<T> {
    /// [`MUTEX_UNLOCKED`], [`MUTEX_LOCKED`] or [`MUTEX_SLEEPING`].
    key: AtomicU32,
    /// Rounds of active spinning: [`ACTIVE_SPIN`] with more than one CPU,
    /// else 0; `u32::MAX` until the first contended `lock2` asks the
    /// platform (`ncpu` may be a system call).
    spin: AtomicU32,
    platform: &'static dyn Platform,
    data: core::cell::UnsafeCell<T>,
}

// SAFETY: the lock hands `&mut T` to one holder at a time, the holder's
// writes published by the release swap and acquired by the next
// holder's compare-and-swap or swap; the data may move to whichever
// thread holds it, so `T: Send` suffices.
unsafe impl<T: Send> Sync for Mutex<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Mutex<T> {}

/// Holds a [`Mutex`]; releases it when dropped.
pub(crate) struct MutexGuard<'a, T> {
    m: &'a Mutex<T>,
}

impl<T> Mutex<T> {
    /// An unlocked lock around `data`, whose waiters sleep on `platform`'s
    /// futex.
    pub(crate) const fn new(platform: &'static dyn Platform, data: T) -> Self {
        Mutex {
            key: AtomicU32::new(MUTEX_UNLOCKED),
            spin: AtomicU32::new(u32::MAX),
            platform,
            data: core::cell::UnsafeCell::new(data),
        }
    }

    /// Takes the lock (Go's `lock2`), waiting as long as it takes.
    #[inline]
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        // Acquire: pairs with the Release of unlock2's swap.
        if self
            .key
            .compare_exchange(
                MUTEX_UNLOCKED,
                MUTEX_LOCKED,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_err()
        {
            self.lock2_slow();
        }
        MutexGuard { m: self }
    }

    /// One compare-and-swap if the lock looks free.
    #[inline]
    fn try_take(&self) -> bool {
        self.key.load(Ordering::Relaxed) == MUTEX_UNLOCKED
            && self
                .key
                .compare_exchange(
                    MUTEX_UNLOCKED,
                    MUTEX_LOCKED,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// The contended part of `lock2`: spin, yield, sleep, as Go. Out of
    /// line, as the wake-up in `unlock2`: inlined, they cost every
    /// caller registers and instructions on its uncontended path.
    #[cold]
    #[inline(never)]
    fn lock2_slow(&self) {
        let mut spin = self.spin.load(Ordering::Relaxed);
        if spin == u32::MAX {
            spin = if self.platform.ncpu() > 1 {
                ACTIVE_SPIN
            } else {
                0
            };
            self.spin.store(spin, Ordering::Relaxed);
        }
        for _ in 0..spin {
            if self.try_take() {
                return;
            }
            procyield(ACTIVE_SPIN_CNT);
        }
        for _ in 0..PASSIVE_SPIN {
            if self.try_take() {
                return;
            }
            self.platform.osyield();
        }
        // Mark the key: the holder's release will see it (see the type's
        // docs). Acquire: if the lock was free, it is ours now.
        while self.key.swap(MUTEX_SLEEPING, Ordering::Acquire) != MUTEX_UNLOCKED {
            self.platform.futexsleep(&self.key, MUTEX_SLEEPING, None);
        }
    }

    /// Releases the lock (Go's `unlock2`): a swap, and a futex wake-up
    /// only if a waiter marked the key.
    #[inline]
    fn unlock2(&self) {
        // Release: publishes the holder's writes to the next holder.
        if self.key.swap(MUTEX_UNLOCKED, Ordering::Release) == MUTEX_SLEEPING {
            self.wakeup();
        }
    }

    /// Wakes a sleeping waiter.
    #[cold]
    #[inline(never)]
    fn wakeup(&self) {
        self.platform.futexwakeup(&self.key, 1);
    }
}

/// `cnt` spin-wait hints (Go's `procyield`: x86's `pause`).
#[inline]
fn procyield(cnt: u32) {
    for _ in 0..cnt {
        core::hint::spin_loop();
    }
}

impl<T> core::ops::Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard's existence means this thread holds the lock.
        unsafe { &*self.m.data.get() }
    }
}

impl<T> core::ops::DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref; `&mut self` makes the borrow unique.
        unsafe { &mut *self.m.data.get() }
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.m.unlock2();
    }
}
