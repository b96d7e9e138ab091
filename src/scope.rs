//! Scoped goroutines (hosted): [`Runtime::scope`] runs a main goroutine
//! that may borrow from its caller, and goroutines started with
//! [`Scope::spawn`] / [`Scope::go`] may borrow too — as
//! `std::thread::scope` does for threads.
//!
//! # Why it is sound
//!
//! The scope counts its goroutines itself (not their handles): one for the
//! main goroutine and one per spawn, taken back only when the goroutine's
//! closure, its result (unless a handle still holds it) and everything it
//! captured have been dropped. `scope` returns (or resumes a panic) only
//! when the count is zero, whatever happens meanwhile:
//!
//! - a handle forgotten (`mem::forget`) or leaked changes nothing: the
//!   count is not in the handle;
//! - the main closure panics, or a goroutine does: the panic is caught on
//!   the goroutine, the scope still waits for all of them, and panics
//!   afterwards;
//! - the runtime cannot be dropped or shut down meanwhile: `scope` borrows
//!   it for the whole call (and a runtime's own goroutines cannot own it
//!   while a scope borrows it);
//! - a deadlock cannot end the wait: a parked goroutine may hold borrowed
//!   references, so, unlike [`block_on`](Runtime::block_on), `scope`
//!   cannot return `Err(Deadlock)`. It prints the deadlock report on
//!   stderr (once) and goes on waiting, as `std::thread::scope` would with
//!   deadlocked threads;
//! - a goroutine started inside the scope with plain [`go`](crate::go) or
//!   [`spawn`](crate::spawn) must be `'static`, so it cannot take a
//!   borrowed value out of the scope.
//!
//! What must not compile does not:
//!
//! ```compile_fail,E0373
//! // A plain spawn from a scoped goroutine, with a borrowed value.
//! let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
//! let local = vec![1, 2, 3];
//! rt.scope(|_| gokernel::spawn(|| local.len()).join().unwrap());
//! ```
//!
//! ```compile_fail
//! // A handle cannot leave its scope.
//! let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
//! let h = rt.scope(|s| s.spawn(|| 1));
//! ```
//!
//! ```compile_fail,E0499
//! // Two goroutines cannot both borrow the same value mutably.
//! let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
//! let mut n = 0;
//! rt.scope(|s| {
//!     s.go(|| n += 1);
//!     s.go(|| n += 1);
//! });
//! ```
//!
//! ```compile_fail,E0373
//! // A goroutine cannot borrow the scope closure's own locals: they die
//! // before the scope's goroutines are waited for.
//! let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
//! rt.scope(|s| {
//!     let short = 5;
//!     s.go(|| assert_eq!(short, 5));
//! });
//! ```
//!
//! ```compile_fail,E0505
//! // The runtime cannot be dropped while a scope runs on it.
//! let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
//! rt.scope(|_| drop(rt));
//! ```

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::io::Write;
use std::thread;

use crate::runtime::{HookGuard, JoinHandle, JoinInner, JoinSignal, Runtime, finish};
use crate::runtime2::Sched;
use crate::tls::getg;

/// What a scope and its goroutines share (kept alive by each, so the last
/// goroutine can wake the scope after the count reaches zero).
struct ScopeData {
    /// Goroutines whose closures are not all gone yet.
    running: AtomicUsize,
    /// Goroutines that panicked and whose panic no `join` took.
    unhandled_panics: AtomicUsize,
    /// The waiting thread's wake-up.
    signal: Arc<JoinSignal>,
    /// Set by the deadlock hook.
    deadlocked: AtomicBool,
}

/// Taken by each goroutine of the scope; dropping it gives the count back
/// (after everything the goroutine held that may borrow is gone).
struct Member(Arc<ScopeData>);

impl Drop for Member {
    fn drop(&mut self) {
        // Release: the goroutine's writes to borrowed data happen before
        // the scope sees zero (acquire in `wait`).
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.signal.notify();
        }
    }
}

/// A scope to start goroutines that borrow, from [`Runtime::scope`]. See
/// the [module docs](self) for what it guarantees.
pub struct Scope<'scope, 'env: 'scope> {
    data: Arc<ScopeData>,
    sched: &'scope Sched,
    /// Invariance over `'scope`, as `std::thread::Scope`.
    scope: PhantomData<&'scope mut &'scope ()>,
    env: PhantomData<&'env mut &'env ()>,
}

/// A handle to join a goroutine of a [`Scope`]; it cannot outlive the
/// scope. Dropping it detaches the goroutine (the scope still waits for
/// it, and panics at its end if it panicked).
pub struct ScopedJoinHandle<'scope, T> {
    handle: JoinHandle<T>,
    data: Arc<ScopeData>,
    scope: PhantomData<&'scope ()>,
}

impl<T> ScopedJoinHandle<'_, T> {
    /// The goroutine's id.
    pub fn id(&self) -> u64 {
        self.handle.id()
    }

    /// True once the goroutine has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the goroutine and returns its result, or its panic
    /// payload (which the scope then no longer reports).
    ///
    /// # Errors
    ///
    /// The goroutine's panic payload, if it panicked.
    pub fn join(self) -> thread::Result<T> {
        let r = self.handle.join();
        if r.is_err() {
            self.data.unhandled_panics.fetch_sub(1, Ordering::Relaxed);
        }
        r
    }
}

/// A scoped goroutine's closure and what it must drop, in this order: the
/// closure (if it never ran), the handle's finisher, then the count.
struct Body<F, T> {
    f: Option<F>,
    inner: Option<Arc<JoinInner<T>>>,
    member: Member,
}

impl<F, T> Drop for Body<F, T> {
    fn drop(&mut self) {
        // Never ran (the runtime dropped it unrun): the handle reports it.
        drop(self.f.take());
        if let Some(inner) = self.inner.take() {
            finish(&inner, Err(Box::new(crate::RuntimeDropped)));
        }
        // `member` is dropped after this, last.
    }
}

impl<'scope, 'env> Scope<'scope, 'env> {
    /// Starts a goroutine running `f`, which may borrow anything that
    /// outlives the scope, and returns a handle to join it. A panic in it
    /// comes back from [`join`](ScopedJoinHandle::join), or, if nobody
    /// joins it, makes the scope panic once every goroutine is done.
    ///
    /// ```
    /// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
    /// let words = ["go", "kernel"];
    /// let total = rt.scope(|s| {
    ///     let hs: Vec<_> = words.iter().map(|w| s.spawn(move || w.len())).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).sum::<usize>()
    /// });
    /// assert_eq!(total, 8);
    /// ```
    ///
    /// # Panics
    ///
    /// If the goroutine's stack cannot be allocated.
    #[track_caller]
    pub fn spawn<F, T>(&'scope self, f: F) -> ScopedJoinHandle<'scope, T>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope,
    {
        let handle = spawn_scoped(self.sched, &self.data, f);
        ScopedJoinHandle {
            handle,
            data: self.data.clone(),
            scope: PhantomData,
        }
    }

    /// [`spawn`](Self::spawn) without a handle (Go's `go` statement): the
    /// scope waits for it all the same.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    ///
    /// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
    /// let hits = AtomicU32::new(0);
    /// rt.scope(|s| {
    ///     for _ in 0..10 {
    ///         s.go(|| {
    ///             hits.fetch_add(1, Ordering::Relaxed);
    ///         });
    ///     }
    /// });
    /// assert_eq!(hits.into_inner(), 10); // every one finished first
    /// ```
    ///
    /// # Panics
    ///
    /// If the goroutine's stack cannot be allocated.
    #[track_caller]
    pub fn go<F>(&'scope self, f: F)
    where
        F: FnOnce() + Send + 'scope,
    {
        drop(self.spawn(f));
    }
}

/// Starts a goroutine of the scope `data` on `sched`.
#[track_caller]
fn spawn_scoped<'scope, F, T>(sched: &Sched, data: &Arc<ScopeData>, f: F) -> JoinHandle<T>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    // Counted before the goroutine exists, so the scope cannot see zero
    // while it is being started.
    data.running.fetch_add(1, Ordering::Relaxed);
    let inner = Arc::new(JoinInner::new(sched as *const Sched as usize));
    let mut body = Body {
        f: Some(f),
        inner: Some(inner.clone()),
        member: Member(data.clone()),
    };
    let run = move || {
        let f = body.f.take().expect("a goroutine body runs once");
        let r = std::panic::catch_unwind(core::panic::AssertUnwindSafe(f));
        if r.is_err() {
            body.member
                .0
                .unhandled_panics
                .fetch_add(1, Ordering::Relaxed);
        }
        let inner = body.inner.take().expect("a goroutine body runs once");
        finish(&inner, r);
        // The handle's Arc is the last one if it was dropped: the result
        // (which may borrow) is dropped here, before the count.
        drop(inner);
        drop(body);
    };
    let run: Box<dyn FnOnce() + Send + 'scope> = Box::new(run);
    // SAFETY: only the lifetime changes. Everything `run` holds that may
    // borrow ('scope) is dropped before its `Member`, and the scope does
    // not end before every Member is dropped (`Runtime::scope` waits for
    // the count to reach zero, panics included, and the runtime, borrowed
    // by the scope, cannot drop the closure unrun behind its back except
    // through `Body::drop`, which drops the Member last). So nothing
    // borrowed is used after 'scope.
    let run = unsafe {
        core::mem::transmute::<Box<dyn FnOnce() + Send + 'scope>, Box<dyn FnOnce() + Send + 'static>>(
            run,
        )
    };
    match crate::proc::newproc(Some(sched), run, true) {
        Ok(id) => JoinHandle::from_parts(inner, id),
        // The closure was dropped, and with it its Member.
        Err(e) => panic!("gokernel: {}", crate::SpawnError(e)),
    }
}

/// Ends the process if dropped: [`Runtime::scope`] holds one while it
/// waits for its goroutines and forgets it once they are done, so a panic
/// in the wait (a bug) cannot unwind into the caller's frame while they
/// may still borrow from it.
struct MustNotUnwind;

impl Drop for MustNotUnwind {
    fn drop(&mut self) {
        crate::panic::throw(
            "Runtime::scope: a panic while waiting for its goroutines, which may hold borrows of \
             the caller's frame (it cannot unwind)",
        );
    }
}

impl Runtime {
    /// [`block_on`](Self::block_on) for a main goroutine that borrows from
    /// its caller, with a [`Scope`] to start goroutines that borrow too
    /// (as `std::thread::scope`). Returns `f`'s value once `f` and every
    /// goroutine of the scope have finished, joined or not.
    ///
    /// ```
    /// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
    /// let mut data = vec![1, 2, 3, 4];
    /// let (left, right) = data.split_at_mut(2);
    /// rt.scope(|s| {
    ///     s.go(|| left.iter_mut().for_each(|x| *x *= 10));
    ///     s.go(|| right.iter_mut().for_each(|x| *x += 1));
    /// });
    /// assert_eq!(data, [10, 20, 4, 5]);
    /// ```
    ///
    /// A deadlock cannot be returned here (a parked goroutine may hold a
    /// borrow): the report is printed on stderr and `scope` goes on
    /// waiting. See the [`scope`](crate::scope) module for what else it
    /// guarantees.
    ///
    /// # Panics
    ///
    /// If called from a goroutine (it would block its thread); if a
    /// goroutine's stack cannot be allocated; with `f`'s panic, once every
    /// goroutine has finished; and, after that, if a goroutine of the
    /// scope panicked and nobody joined it.
    #[track_caller]
    pub fn scope<'env, F, T>(&self, f: F) -> T
    where
        F: for<'scope> FnOnce(&'scope Scope<'scope, 'env>) -> T + Send,
        T: Send,
    {
        assert!(
            getg().is_null(),
            "gokernel: Runtime::scope called from a goroutine; use Scope::spawn and join instead"
        );
        let data = Arc::new(ScopeData {
            running: AtomicUsize::new(0),
            unhandled_panics: AtomicUsize::new(0),
            signal: JoinSignal::current(),
            deadlocked: AtomicBool::new(false),
        });
        let scope = Scope {
            data: data.clone(),
            sched: self.sched(),
            scope: PhantomData,
            env: PhantomData,
        };
        let d = data.clone();
        // As in block_on: no deadlock decided before the main goroutine
        // is queued reaches the hook.
        let spawning = crate::spawning::Spawning::begin(self.sched());
        let hook = HookGuard {
            sched: self.sched(),
            key: self.sched().add_deadlock_hook(Box::new(move || {
                d.deadlocked.store(true, Ordering::SeqCst);
                d.signal.notify();
            })),
        };
        // The main goroutine: a scoped goroutine like the others, whose
        // panic is resumed here rather than counted.
        let main = {
            let scope = &scope;
            spawn_scoped(self.sched(), &data, move || f(scope))
        };
        drop(spawning);
        // From here until every goroutine is done, nothing may unwind out
        // of this frame: they may hold borrows of the caller's.
        let no_unwind = MustNotUnwind;
        let mut reported = false;
        loop {
            // The deadlock flag before the count, as in JoinHandle::wait:
            // a deadlock may be reported after the last goroutine of the
            // scope finished (goroutines parked earlier, outside it, are
            // left), and must not be printed then. That report is decided
            // under the scheduler lock after the last goroutine's P went
            // idle, which its M did after Member's decrement; the hook
            // stores the flag after that, so seeing it set (SeqCst, an
            // acquire) orders the load of the count below after the
            // decrement, and the count is seen at zero.
            let deadlocked = data.deadlocked.swap(false, Ordering::SeqCst);
            // Acquire: pairs with Member's release.
            if data.running.load(Ordering::Acquire) == 0 {
                break;
            }
            if deadlocked && !reported {
                reported = true;
                // Not `eprintln!`, which panics when stderr fails (a
                // closed pipe): the report is best effort.
                let _ = writeln!(
                    std::io::stderr(),
                    "gokernel: Runtime::scope: {}\n\n(the scope cannot return while its goroutines may hold borrows: it goes on waiting)",
                    crate::runtime::deadlock_report(self.sched())
                );
            }
            data.signal.wait();
        }
        core::mem::forget(no_unwind);
        drop(hook);
        let r = main.join();
        // The main goroutine's panic was counted; it is resumed instead.
        let unhandled = data.unhandled_panics.load(Ordering::Relaxed) - usize::from(r.is_err());
        match r {
            Err(p) => std::panic::resume_unwind(p),
            Ok(_) if unhandled != 0 => panic!("gokernel: a scoped goroutine panicked"),
            Ok(v) => v,
        }
    }
}
