//! [`Mutex`], [`WaitGroup`] and [`Once`] (Go's `sync` package) for
//! goroutines: a goroutine that has to wait parks, so its M runs other
//! goroutines meanwhile; a plain thread that has to wait blocks.
//!
//! ```
//! use std::sync::Arc;
//! use gokernel::sync::{Mutex, WaitGroup};
//! # gokernel::Runtime::builder().procs(2).build().unwrap().block_on(|| {
//! let total = Arc::new(Mutex::new(0u64));
//! let wg = Arc::new(WaitGroup::new());
//! for i in 1..=100 {
//!     wg.add(1);
//!     let (total, wg) = (total.clone(), wg.clone());
//!     gokernel::go(move || {
//!         *total.lock() += i;
//!         wg.done();
//!     });
//! }
//! wg.wait();
//! assert_eq!(*total.lock(), 5050);
//! # }).unwrap();
//! ```

use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::proc::current_user_g;
use crate::runtime2::WaitReason;
use crate::sema::{SpinLock, WaitQ, Wakeup};

// ---------------------------------------------------------------------
// Mutex

/// The lock is held.
const LOCKED: u32 = 1;
/// Goroutines or threads are queued (the queue is not empty).
const WAITERS: u32 = 2;
/// Starvation mode: `unlock` hands the lock straight to the first waiter
/// instead of letting it compete with newcomers.
const HANDOFF: u32 = 4;

/// How many times a woken waiter may lose the lock to newcomers before it
/// asks for starvation mode.
pub const MUTEX_STARVE_AFTER: u32 = 4;

/// A mutual-exclusion lock for goroutines (Go's `sync.Mutex`, holding its
/// data like `std::sync::Mutex`).
///
/// Uncontended, `lock` and `unlock` are one compare-and-swap each. A
/// goroutine that finds it held parks in a FIFO queue. `unlock` wakes the
/// first waiter, which then competes with goroutines that arrive meanwhile
/// (throughput: a running goroutine usually wins). A waiter that loses
/// [`MUTEX_STARVE_AFTER`] times in a row switches the mutex to starvation
/// mode, as Go's does after 1 ms: then `unlock` hands the lock straight to
/// the first waiter and newcomers queue behind it, so no waiter waits
/// forever behind a stream of fast lockers. The mode ends when the queue
/// empties.
///
/// There is no poisoning: a panic while holding the lock releases it.
/// Locking it again from the goroutine that holds it deadlocks, as in Go.
///
/// ```
/// use std::sync::Arc;
/// use gokernel::sync::Mutex;
/// # gokernel::Runtime::builder().procs(2).build().unwrap().block_on(|| {
/// let hits = Arc::new(Mutex::new(Vec::new()));
/// let hs: Vec<_> = (0..4)
///     .map(|i| {
///         let hits = hits.clone();
///         gokernel::spawn(move || hits.lock().push(i))
///     })
///     .collect();
/// hs.into_iter().for_each(|h| h.join().unwrap());
/// let mut v = hits.lock().clone();
/// v.sort();
/// assert_eq!(v, [0, 1, 2, 3]);
/// # }).unwrap();
/// ```
pub struct Mutex<T: ?Sized> {
    state: AtomicU32,
    q: SpinLock,
    waiters: UnsafeCell<WaitQ>,
    data: UnsafeCell<T>,
}

// SAFETY: the data is reached only through a guard, by one holder at a
// time; it moves between threads with the lock (T: Send).
unsafe impl<T: ?Sized + Send> Send for Mutex<T> {}
// SAFETY: as above; the queue is touched only under `q`.
unsafe impl<T: ?Sized + Send> Sync for Mutex<T> {}

/// Proof of holding a [`Mutex`]; unlocks when dropped.
pub struct MutexGuard<'a, T: ?Sized> {
    m: &'a Mutex<T>,
}

// SAFETY: a guard gives `&T` to whoever has `&MutexGuard`.
unsafe impl<T: ?Sized + Sync> Sync for MutexGuard<'_, T> {}

impl<T> Mutex<T> {
    /// An unlocked mutex holding `value`.
    pub const fn new(value: T) -> Self {
        Mutex {
            state: AtomicU32::new(0),
            q: SpinLock::new(),
            waiters: UnsafeCell::new(WaitQ::new()),
            data: UnsafeCell::new(value),
        }
    }

    /// The data, consuming the mutex.
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Locks, waiting as long as it takes (Go's `Lock`).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        // Who uses it (one load in the common case): a goroutine of
        // another runtime waiting for a holder from here is then no
        // deadlock of its runtime (see `SpinLock::note`).
        self.q.note();
        // Acquire: the previous holder's writes to the data are visible.
        if self
            .state
            .compare_exchange(0, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_slow();
        }
        MutexGuard { m: self }
    }

    /// Locks if that can be done without waiting (Go's `TryLock`).
    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        // As in `lock`.
        self.q.note();
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & (LOCKED | HANDOFF) != 0 {
                return None;
            }
            // Acquire: as in `lock`.
            match self.state.compare_exchange_weak(
                s,
                s | LOCKED,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(MutexGuard { m: self }),
                Err(now) => s = now,
            }
        }
    }

    /// True if someone holds the lock now.
    pub fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) & LOCKED != 0
    }

    /// The data, through `&mut` (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }

    /// Waits for the lock in the queue.
    #[cold]
    fn lock_slow(&self) {
        let mut lost = 0u32;
        loop {
            self.q.lock();
            // Under `q`: take the lock if it is free (and not promised to a
            // waiter), or record that we wait. The WAITERS bit is set with a
            // CAS that fails if the holder unlocked meanwhile, so an
            // `unlock` either sees it (and takes the slow path, which waits
            // for `q`) or happened before it (and we take the lock here).
            let mut s = self.state.load(Ordering::Relaxed);
            loop {
                if s & (LOCKED | HANDOFF) == 0 {
                    match self.state.compare_exchange_weak(
                        s,
                        s | LOCKED,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => {
                            // SAFETY: we hold q.
                            unsafe { self.q.unlock() };
                            return;
                        }
                        Err(now) => s = now,
                    }
                    continue;
                }
                let mut want = s | WAITERS;
                if lost >= MUTEX_STARVE_AFTER {
                    want |= HANDOFF;
                }
                match self.state.compare_exchange_weak(
                    s,
                    want,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => s = now,
                }
            }
            // A woken waiter that lost keeps its place at the front.
            // SAFETY: we hold q, which guards the queue; `unlock` wakes us.
            let handed = unsafe {
                WaitQ::wait(
                    self.waiters.get(),
                    &self.q,
                    core::ptr::null_mut(),
                    lost > 0,
                    WaitReason::SyncMutexLock,
                )
            };
            if handed {
                // Handed over in starvation mode: the lock is ours. The
                // hand-off's wake-up orders the previous holder's writes
                // before us.
                return;
            }
            lost += 1;
        }
    }

    /// Unlocks (Go's `Unlock`).
    ///
    /// # Safety
    ///
    /// The caller holds the lock.
    unsafe fn unlock(&self) {
        // Release: our writes to the data happen before the next holder's.
        if self
            .state
            .compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)
            .is_err()
        {
            self.unlock_slow();
        }
    }

    /// Unlocks with waiters queued: wakes the first, or hands it the lock.
    #[cold]
    fn unlock_slow(&self) {
        self.q.lock();
        // SAFETY: under q.
        let q = unsafe { &mut *self.waiters.get() };
        // SAFETY: under q.
        let next = unsafe { q.dequeue() };
        let empty = q.is_empty();
        let s = self.state.load(Ordering::Relaxed);
        let wakeup: Option<Wakeup> = match next {
            Some((sg, wakeup)) if s & HANDOFF != 0 => {
                // Starvation mode: LOCKED stays set; the waiter owns it.
                if empty {
                    self.state
                        .fetch_and(!(WAITERS | HANDOFF), Ordering::Relaxed);
                }
                // SAFETY: claimed by dequeue; ours until woken.
                unsafe { (*(*sg).waiter).complete(0, true) };
                Some(wakeup)
            }
            next => {
                let mut clear = LOCKED;
                if empty {
                    clear |= WAITERS | HANDOFF;
                }
                // Release: as in `unlock`.
                self.state.fetch_and(!clear, Ordering::Release);
                next.map(|(sg, wakeup)| {
                    // SAFETY: claimed by dequeue; ours until woken. It
                    // will compete for the lock.
                    unsafe { (*(*sg).waiter).complete(0, false) };
                    wakeup
                })
            }
        };
        // SAFETY: we hold q.
        unsafe { self.q.unlock() };
        if let Some(w) = wakeup {
            w.wake();
        }
    }
}

impl<T: Default> Default for Mutex<T> {
    fn default() -> Self {
        Mutex::new(T::default())
    }
}

impl<T: ?Sized> core::fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mutex")
            .field("locked", &self.is_locked())
            .finish_non_exhaustive()
    }
}

impl<T: ?Sized> core::ops::Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard proves we hold the lock.
        unsafe { &*self.m.data.get() }
    }
}

impl<T: ?Sized> core::ops::DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard proves we hold the lock.
        unsafe { &mut *self.m.data.get() }
    }
}

impl<T: ?Sized> Drop for MutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the guard proves we hold the lock.
        unsafe { self.m.unlock() };
    }
}

// ---------------------------------------------------------------------
// WaitGroup

/// Waits for a collection of goroutines to finish (Go's
/// `sync.WaitGroup`): [`add`](Self::add) the number to wait for, each
/// calls [`done`](Self::done), and [`wait`](Self::wait) returns when the
/// count is back to zero. Share it with an `Arc`.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use gokernel::sync::WaitGroup;
/// # gokernel::Runtime::builder().procs(2).build().unwrap().block_on(|| {
/// let wg = Arc::new(WaitGroup::new());
/// let n = Arc::new(AtomicU32::new(0));
/// for _ in 0..8 {
///     wg.add(1);
///     let (wg, n) = (wg.clone(), n.clone());
///     gokernel::go(move || {
///         n.fetch_add(1, Ordering::Relaxed);
///         wg.done();
///     });
/// }
/// wg.wait(); // parks until all eight called done
/// assert_eq!(n.load(Ordering::Relaxed), 8);
/// # }).unwrap();
/// ```
pub struct WaitGroup {
    q: SpinLock,
    st: UnsafeCell<WgState>,
}

struct WgState {
    count: i64,
    waiters: WaitQ,
}

// SAFETY: the state is only touched under `q`.
unsafe impl Send for WaitGroup {}
// SAFETY: as above.
unsafe impl Sync for WaitGroup {}

impl WaitGroup {
    /// A wait group with a count of zero.
    pub const fn new() -> Self {
        WaitGroup {
            q: SpinLock::new(),
            st: UnsafeCell::new(WgState {
                count: 0,
                waiters: WaitQ::new(),
            }),
        }
    }

    /// Adds `delta` (which may be negative) to the count; at zero, every
    /// waiter wakes.
    ///
    /// # Panics
    ///
    /// If the count would go negative, with Go's message
    /// `sync: negative WaitGroup counter`, or above `i64::MAX`, with
    /// `sync: WaitGroup counter overflow`; the count is left unchanged and
    /// the group stays usable.
    pub fn add(&self, delta: i64) {
        self.q.lock();
        // SAFETY: under q.
        let st = unsafe { &mut *self.st.get() };
        // Checked, and the lock released before any panic: a panic under
        // `q` would leave it held, and every later call spinning.
        let Some(count) = st.count.checked_add(delta) else {
            // SAFETY: we hold q.
            unsafe { self.q.unlock() };
            if delta < 0 {
                panic!("sync: negative WaitGroup counter");
            }
            panic!("sync: WaitGroup counter overflow");
        };
        if count < 0 {
            // SAFETY: we hold q.
            unsafe { self.q.unlock() };
            panic!("sync: negative WaitGroup counter");
        }
        st.count = count;
        let wake = if count == 0 {
            // SAFETY: under q.
            unsafe { st.waiters.dequeue_all(true) }
        } else {
            Vec::new()
        };
        // SAFETY: we hold q.
        unsafe { self.q.unlock() };
        for w in wake {
            w.wake();
        }
    }

    /// Takes one off the count (`add(-1)`).
    pub fn done(&self) {
        self.add(-1);
    }

    /// The count now.
    pub fn count(&self) -> i64 {
        self.q.lock();
        // SAFETY: under q.
        let n = unsafe { (*self.st.get()).count };
        // SAFETY: we hold q.
        unsafe { self.q.unlock() };
        n
    }

    /// Waits until the count is zero.
    pub fn wait(&self) {
        self.q.lock();
        // SAFETY: under q.
        let st = unsafe { &mut *self.st.get() };
        if st.count == 0 {
            // SAFETY: we hold q.
            unsafe { self.q.unlock() };
            return;
        }
        // SAFETY: we hold q, which guards the queue; `add` wakes us.
        unsafe {
            WaitQ::wait(
                &raw mut (*self.st.get()).waiters,
                &self.q,
                core::ptr::null_mut(),
                false,
                WaitReason::SyncWaitGroupWait,
            )
        };
    }
}

impl Default for WaitGroup {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for WaitGroup {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WaitGroup")
            .field("count", &self.count())
            .finish()
    }
}

// ---------------------------------------------------------------------
// Once

const ONCE_NEW: u32 = 0;
const ONCE_RUNNING: u32 = 1;
const ONCE_DONE: u32 = 2;

/// Runs a function exactly once (Go's `sync.Once`): the first
/// [`call_once`](Self::call_once) runs it, every other call waits until it
/// has finished. If it panics it counts as done, as in Go.
///
/// ```
/// use std::sync::Arc;
/// use gokernel::sync::{Mutex, Once};
/// # gokernel::Runtime::builder().procs(2).build().unwrap().block_on(|| {
/// let once = Arc::new(Once::new());
/// let inits = Arc::new(Mutex::new(0));
/// let hs: Vec<_> = (0..4)
///     .map(|_| {
///         let (once, inits) = (once.clone(), inits.clone());
///         gokernel::spawn(move || once.call_once(|| *inits.lock() += 1))
///     })
///     .collect();
/// hs.into_iter().for_each(|h| h.join().unwrap());
/// assert_eq!(*inits.lock(), 1);
/// assert!(once.is_completed());
/// # }).unwrap();
/// ```
pub struct Once {
    state: AtomicU32,
    q: SpinLock,
    st: UnsafeCell<OnceState>,
}

struct OnceState {
    /// The goroutine running the function (0: a thread).
    runner: u64,
    /// The plain thread running the function (with `std`; `None` when a
    /// goroutine runs it), so that a thread's recursive call panics as a
    /// goroutine's does instead of waiting for itself for ever.
    #[cfg(feature = "std")]
    runner_thread: Option<std::thread::ThreadId>,
    waiters: WaitQ,
}

// SAFETY: the state is only touched under `q`.
unsafe impl Send for Once {}
// SAFETY: as above.
unsafe impl Sync for Once {}

impl Once {
    /// A `Once` that has not run.
    pub const fn new() -> Self {
        Once {
            state: AtomicU32::new(ONCE_NEW),
            q: SpinLock::new(),
            st: UnsafeCell::new(OnceState {
                runner: 0,
                #[cfg(feature = "std")]
                runner_thread: None,
                waiters: WaitQ::new(),
            }),
        }
    }

    /// True once the function has run.
    pub fn is_completed(&self) -> bool {
        self.state.load(Ordering::Acquire) == ONCE_DONE
    }

    /// Runs `f` if no call has yet; otherwise waits until the first call's
    /// function has returned (Go's `Do`).
    ///
    /// # Panics
    ///
    /// When `f` calls `call_once` on the same `Once` from the same
    /// goroutine (it could never return): the message names the goroutine.
    /// Likewise from the same plain thread (with `std`), naming the
    /// thread; without `std` such a thread waits for itself for good.
    pub fn call_once(&self, f: impl FnOnce()) {
        // Acquire: the function's effects are visible once DONE is seen.
        if self.state.load(Ordering::Acquire) == ONCE_DONE {
            return;
        }
        self.call_slow(f);
    }

    #[cold]
    fn call_slow(&self, f: impl FnOnce()) {
        let me = current_user_g();
        // SAFETY: a non-null current user G is alive.
        let my_id = if me.is_null() {
            0
        } else {
            unsafe { (*me).goid() }
        };
        // A plain thread is named by its id (the goroutines of one OS
        // thread are not one caller: they are told apart by goid).
        #[cfg(feature = "std")]
        let my_thread = me.is_null().then(|| std::thread::current().id());
        self.q.lock();
        // SAFETY: under q.
        let st = unsafe { &mut *self.st.get() };
        match self.state.load(Ordering::Acquire) {
            ONCE_DONE => {
                // SAFETY: we hold q.
                unsafe { self.q.unlock() };
            }
            ONCE_RUNNING => {
                if my_id != 0 && st.runner == my_id {
                    // SAFETY: we hold q.
                    unsafe { self.q.unlock() };
                    panic!("sync: Once.call_once called recursively by goroutine {my_id}");
                }
                #[cfg(feature = "std")]
                if my_thread.is_some() && st.runner_thread == my_thread {
                    // SAFETY: we hold q.
                    unsafe { self.q.unlock() };
                    let t = std::thread::current();
                    panic!(
                        "sync: Once.call_once called recursively by thread {:?} ({:?})",
                        t.name().unwrap_or("<unnamed>"),
                        t.id()
                    );
                }
                // SAFETY: we hold q, which guards the queue; the runner
                // wakes us when it is done.
                unsafe {
                    WaitQ::wait(
                        &raw mut (*self.st.get()).waiters,
                        &self.q,
                        core::ptr::null_mut(),
                        false,
                        WaitReason::SyncOnce,
                    )
                };
            }
            _ => {
                self.state.store(ONCE_RUNNING, Ordering::Relaxed);
                st.runner = my_id;
                #[cfg(feature = "std")]
                {
                    st.runner_thread = my_thread;
                }
                // SAFETY: we hold q.
                unsafe { self.q.unlock() };
                // Finishes even if f panics.
                let _done = OnceDone(self);
                f();
            }
        }
    }
}

/// Marks a [`Once`] done and wakes its waiters, also when the function
/// panics.
struct OnceDone<'a>(&'a Once);

impl Drop for OnceDone<'_> {
    fn drop(&mut self) {
        let once = self.0;
        once.q.lock();
        // Release: the function's effects happen before anyone who sees
        // DONE.
        once.state.store(ONCE_DONE, Ordering::Release);
        // SAFETY: under q.
        let st = unsafe { &mut *once.st.get() };
        // SAFETY: under q.
        let wake = unsafe { st.waiters.dequeue_all(true) };
        // SAFETY: we hold q.
        unsafe { once.q.unlock() };
        for w in wake {
            w.wake();
        }
    }
}

impl Default for Once {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Debug for Once {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Once")
            .field("done", &self.is_completed())
            .finish()
    }
}

// A panic cannot leave these half-changed: their state changes under
// their lock in steps that do not panic (a negative or overflowing WaitGroup
// count is refused before it is stored; a panicking `Once` function still marks it
// done). A `Mutex` is not marked: without poisoning, data left half
// changed by a panic would be seen by the next holder.
impl core::panic::RefUnwindSafe for WaitGroup {}
impl core::panic::RefUnwindSafe for Once {}
