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
