//! One-shot wake-up notes on futexes (Go's `lock_futex.go`: `notesleep`,
//! `notewakeup`, `noteclear`).
//!
//! An idle M sleeps on its note in `stopm`; `startm` wakes it. A wake-up
//! that comes before the sleep is not lost: the note stays set until
//! `noteclear`.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::platform::Platform;

/// A note: 0 = clear, 1 = woken.
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
    while n.key.load(Ordering::Acquire) == 0 {
        p.futexsleep(&n.key, 0, None);
    }
}

/// Wakes the sleeper on `n`, or the next one to sleep (Go's `notewakeup`).
pub fn notewakeup(p: &dyn Platform, n: &Note) {
    // Release: publishes the waker's writes to the sleeper.
    let old = n.key.swap(1, Ordering::Release);
    if old != 0 {
        crate::panic::throw("notewakeup: double wakeup");
    }
    p.futexwakeup(&n.key, 1);
}

/// Clears `n` for reuse (Go's `noteclear`). Only its sleeper calls it,
/// after waking.
pub fn noteclear(n: &Note) {
    n.key.store(0, Ordering::Relaxed);
}
