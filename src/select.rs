//! `select` over channel operations (Go's `select.go`: `selectgo`).
//!
//! The [`select!`](macro@crate::select) macro is Go's `select` statement:
//!
//! ```
//! use gokernel::{chan, select};
//! # gokernel::Runtime::builder().procs(1).build().unwrap().block_on(|| {
//! let (a, b) = (chan::<u32>(1), chan::<&str>(1));
//! b.send("hello").unwrap();
//! let got = select! {
//!     recv(a) -> v => format!("a: {v:?}"),
//!     recv(b) -> v => format!("b: {}", v.unwrap()),
//! };
//! assert_eq!(got, "b: hello");
//! // With `default`, select does not wait.
//! let idle = select! {
//!     recv(a) -> _v => false,
//!     send(a, 7) -> res => { res.unwrap(); true },
//!     default => false,
//! };
//! assert!(idle); // a had room, so the send case ran
//! # }).unwrap();
//! ```
//!
//! Each case is `recv(ch) -> pattern => body` or
//! `send(ch, value) -> pattern => body`; a receive's pattern binds
//! `Result<T, RecvError>` (`Err` once `ch` is closed and drained), a send's
//! binds `Result<(), SendError<T>>` (`Err`, with the value, if `ch` is
//! closed). An optional `default => body` runs when no case is ready.
//! Without it, `select!` waits for a case; with no cases it waits forever.
//!
//! When several cases are ready, one is chosen uniformly at random, like
//! Go. The same channel may appear in several cases.
//!
//! [`Select`] with [`RecvCase`] and [`SendCase`] is the same machinery
//! without the macro, for a number of cases known only at run time.
//!
//! # How it works
//!
//! As in Go: the cases are visited in a random order (`pollorder`) with
//! every channel locked, in address order (`lockorder`, so two selects
//! never deadlock on each other's locks); the first case that can proceed
//! runs. If none can, and the select may wait, one
//! [`Waiter`] gets a [`Sudog`] on every case's queue, in lock order
//! (cases on the same channel in their random poll order, so a partner
//! that comes later, taking the first sudog queued, picks among them at
//! random), and parks; the
//! locks are released once it is parked. The first operation on any of
//! those channels that claims the waiter completes that case, and the
//! others lose the claim and drop their sudog. Woken, the select locks
//! all channels again to take its remaining sudogs off their queues.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::chan::{Chan, RecvError, RecvStep, SendError, SendStep};
use crate::runtime2::WaitReason;
use crate::sema::{Sudog, Waiter, Wakeup};

/// One case of a select, type-erased: what `selectgo` needs from it.
///
/// # Safety
///
/// Implementations lock and unlock the one channel named by `key`, and
/// their `*_locked` methods may only be called under that lock.
pub unsafe trait SelectCase {
    /// The channel's identity (its address).
    fn key(&self) -> usize;
    /// Takes the channel's lock.
    fn lock(&self);
    /// Releases the channel's lock.
    ///
    /// # Safety
    ///
    /// The caller holds it.
    unsafe fn unlock(&self);
    /// Completes the case if it can proceed now; returns what to wake.
    /// `None`: it would block.
    ///
    /// # Safety
    ///
    /// Under the channel's lock.
    unsafe fn poll_locked(&mut self) -> Option<Option<Wakeup>>;
    /// Queues a sudog for `waiter`, as case `index`.
    ///
    /// # Safety
    ///
    /// Under the channel's lock; the case must not move until
    /// [`dequeue_locked`](Self::dequeue_locked) or completion.
    unsafe fn enqueue_locked(&mut self, waiter: &Waiter, index: usize);
    /// Takes its sudog off the queue if it is still there.
    ///
    /// # Safety
    ///
    /// Under the channel's lock.
    unsafe fn dequeue_locked(&mut self);
    /// Records the outcome of a case that fired while waiting.
    fn fired(&mut self, success: bool);
    /// Sets the case's index in its select.
    fn set_index(&mut self, index: usize);
    /// True if the case's channel is used by another runtime or a plain
    /// thread (so a wait on it is not one this runtime alone can end).
    ///
    /// # Safety
    ///
    /// Under the channel's lock.
    unsafe fn shared_locked(&self) -> bool {
        false
    }
    /// Gets a case that may have run in an earlier select ready for a new
    /// one: drops what it still holds from then (a receive's value) and
    /// forgets how it ended. Called by [`Select::case`], before any lock
    /// is taken, so a `Drop` that uses the channel cannot deadlock on it.
    fn reset(&mut self) {}
}

/// The direction of a [`Case`]: [`RecvDir`] or [`SendDir`].
pub trait Dir: private::Sealed {
    /// True for a send.
    const SEND: bool;
}

/// A receive ([`RecvCase`]).
pub enum RecvDir {}
/// A send ([`SendCase`]).
pub enum SendDir {}

impl Dir for RecvDir {
    const SEND: bool = false;
}
impl Dir for SendDir {
    const SEND: bool = true;
}

mod private {
    pub trait Sealed {}
    impl Sealed for super::RecvDir {}
    impl Sealed for super::SendDir {}
}

/// One case of a select on channel `ch`, a receive or a send (`D`); see
/// [`RecvCase`] and [`SendCase`].
pub struct Case<'c, T: Send, D: Dir> {
    ch: &'c Chan<T>,
    /// A send's value until it goes out; a receive's value once it came.
    slot: Option<T>,
    /// The case fired because the channel is closed.
    closed: bool,
    sudog: Option<Sudog>,
    index: usize,
    dir: core::marker::PhantomData<D>,
}

/// A receive case: `recv(ch) -> v`. Made by [`RecvCase::new`], added to a
/// [`Select`] with [`Select::case`]; after the select, if it fired,
/// [`finish`](Self::finish) gives the value.
pub type RecvCase<'c, T> = Case<'c, T, RecvDir>;

/// A send case: `send(ch, value) -> res`. Made by [`SendCase::new`],
/// added to a [`Select`] with [`Select::case`]; after the select, if it
/// fired, [`finish`](Self::finish) says whether the value went out. A send
/// case that did not fire keeps its value
/// ([`into_value`](Self::into_value)).
pub type SendCase<'c, T> = Case<'c, T, SendDir>;

impl<'c, T: Send, D: Dir> Case<'c, T, D> {
    fn with(ch: &'c Chan<T>, slot: Option<T>) -> Self {
        Case {
            ch,
            slot,
            closed: false,
            sudog: None,
            index: usize::MAX,
            dir: core::marker::PhantomData,
        }
    }

    /// The case's index in its select (the order of [`Select::case`]).
    pub fn index(&self) -> usize {
        self.index
    }
}

impl<'c, T: Send> Case<'c, T, RecvDir> {
    /// A case receiving from `ch`.
    pub fn new(ch: &'c Chan<T>) -> Self {
        Self::with(ch, None)
    }

    /// The result of a case that fired: the value, or `Err` if the
    /// channel was closed and drained.
    ///
    /// # Panics
    ///
    /// If the case did not fire.
    ///
    /// # Errors
    ///
    /// [`RecvError`] if the channel was closed and drained.
    ///
    pub fn finish(self) -> Result<T, RecvError> {
        match self.slot {
            Some(v) => Ok(v),
            None if self.closed => Err(RecvError),
            None => panic!("gokernel::select: finish() on a receive case that did not fire"),
        }
    }
}

impl<'c, T: Send> Case<'c, T, SendDir> {
    /// A case sending `v` on `ch`.
    pub fn new(ch: &'c Chan<T>, v: T) -> Self {
        Self::with(ch, Some(v))
    }

    /// The result of a case that fired: `Ok` if the value was sent, `Err`
    /// with the value if the channel was closed.
    ///
    /// # Panics
    ///
    /// If the case did not fire.
    ///
    /// # Errors
    ///
    /// [`SendError`] with the value if the channel was closed.
    ///
    pub fn finish(self) -> Result<(), SendError<T>> {
        match self.slot {
            None => Ok(()),
            Some(v) if self.closed => Err(SendError(v)),
            Some(_) => panic!("gokernel::select: finish() on a send case that did not fire"),
        }
    }

    /// The value of a case that did not fire (`None` if it was sent).
    pub fn into_value(self) -> Option<T> {
        self.slot
    }
}

// SAFETY: every `*_locked` method touches only `self.ch`, under its lock.
unsafe impl<T: Send, D: Dir> SelectCase for Case<'_, T, D> {
    fn key(&self) -> usize {
        self.ch.key()
    }
    fn lock(&self) {
        self.ch.hchan().lock();
    }
    /// # Safety
    ///
    /// As [`SelectCase::unlock`].
    unsafe fn unlock(&self) {
        // SAFETY: the contract: the caller holds the lock.
        unsafe { self.ch.hchan().unlock() };
    }
    /// # Safety
    ///
    /// As [`SelectCase::poll_locked`].
    unsafe fn poll_locked(&mut self) -> Option<Option<Wakeup>> {
        let c = self.ch.hchan();
        if D::SEND {
            let v = self
                .slot
                .take()
                .expect("gokernel::select: a send case without a value");
            // SAFETY: the contract: under the lock.
            match unsafe { c.send_locked(v) } {
                SendStep::Done(wakeup) => Some(wakeup),
                SendStep::Closed(v) => {
                    self.slot = Some(v);
                    self.closed = true;
                    Some(None)
                }
                SendStep::Full(v) => {
                    self.slot = Some(v);
                    None
                }
            }
        } else {
            // SAFETY: the contract: under the lock.
            match unsafe { c.recv_locked() } {
                RecvStep::Done(v, wakeup) => {
                    self.slot = Some(v);
                    Some(wakeup)
                }
                RecvStep::Closed => {
                    self.closed = true;
                    Some(None)
                }
                RecvStep::Empty => None,
            }
        }
    }
    /// # Safety
    ///
    /// As [`SelectCase::enqueue_locked`].
    unsafe fn enqueue_locked(&mut self, waiter: &Waiter, index: usize) {
        let elem = (&mut self.slot as *mut Option<T>).cast();
        let sg = self.sudog.insert(Sudog::new(waiter, elem, index));
        // SAFETY: the contract: under the lock, and `self` (so the sudog)
        // stays put.
        unsafe {
            if D::SEND {
                self.ch.hchan().enqueue_send(sg);
            } else {
                self.ch.hchan().enqueue_recv(sg);
            }
        }
    }
    /// # Safety
    ///
    /// As [`SelectCase::dequeue_locked`].
    unsafe fn dequeue_locked(&mut self) {
        if let Some(sg) = &mut self.sudog {
            // SAFETY: the contract: under the lock.
            unsafe {
                if D::SEND {
                    self.ch.hchan().dequeue_send(sg);
                } else {
                    self.ch.hchan().dequeue_recv(sg);
                }
            }
        }
    }
    fn fired(&mut self, success: bool) {
        self.closed = !success;
    }
    fn set_index(&mut self, index: usize) {
        self.index = index;
    }
    /// # Safety
    ///
    /// As [`SelectCase::shared_locked`].
    unsafe fn shared_locked(&self) -> bool {
        self.ch.hchan().shared()
    }
    fn reset(&mut self) {
        self.closed = false;
        self.sudog = None;
        if D::SEND {
            // Checked here, outside every lock, rather than in poll_locked.
            assert!(
                self.slot.is_some(),
                "gokernel::select: a send case reused after its value was sent"
            );
        } else {
            // The old value is dropped here, with no channel locked.
            self.slot = None;
        }
    }
}

/// A select over cases added with [`case`](Self::case), run with
/// [`wait`](Self::wait) or [`try_wait`](Self::try_wait).
///
/// ```
/// use gokernel::chan;
/// use gokernel::select::{RecvCase, Select};
/// # gokernel::Runtime::builder().procs(1).build().unwrap().block_on(|| {
/// let chans: Vec<_> = (0..4).map(|_| chan::<usize>(1)).collect();
/// chans[2].send(42).unwrap();
/// let mut cases: Vec<_> = chans.iter().map(RecvCase::new).collect();
/// let mut sel = Select::new();
/// for c in &mut cases {
///     sel = sel.case(c);
/// }
/// let fired = sel.wait();
/// assert_eq!(fired, 2);
/// let case = cases.swap_remove(fired);
/// assert_eq!(case.finish(), Ok(42));
/// # }).unwrap();
/// ```
#[derive(Default)]
pub struct Select<'a> {
    cases: Vec<&'a mut dyn SelectCase>,
}

impl<'a> Select<'a> {
    /// A select with no cases.
    pub fn new() -> Self {
        Select { cases: Vec::new() }
    }

    /// Adds a case; its index is the number of cases added before it. A
    /// case may be reused after an earlier select: a receive case drops
    /// the value it still holds from then (here, not under the channel's
    /// lock); a send case must still hold its value.
    ///
    /// # Panics
    ///
    /// If `case` is a send case whose value was already sent.
    pub fn case(mut self, case: &'a mut dyn SelectCase) -> Self {
        case.reset();
        case.set_index(self.cases.len());
        self.cases.push(case);
        self
    }

    /// Waits until a case can proceed, runs it and returns its index.
    /// With no cases, waits forever (Go's `select {}`).
    ///
    /// # Panics
    ///
    /// Never for a well-formed select (a blocking select always returns a
    /// case); the check guards the runtime's own invariant.
    pub fn wait(mut self) -> usize {
        selectgo(&mut self.cases, true)
            .expect("gokernel::select: a blocking select returned no case")
    }

    /// Runs a case that can proceed now and returns its index, or `None`
    /// if none can (Go's `default`).
    pub fn try_wait(mut self) -> Option<usize> {
        selectgo(&mut self.cases, false)
    }
}

/// A random number for the poll order; the sequence only needs to be
/// uniform, not secret.
fn cheaprand() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0x853c_49e6_748f_ea9b);
    // Relaxed: any interleaving gives distinct, well-mixed values.
    let mut z = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Locks every case's channel once, in `lockorder` (Go's `sellock`).
fn sellock(cases: &[&mut dyn SelectCase], lockorder: &[usize]) {
    let mut last = None;
    for &i in lockorder {
        let k = cases[i].key();
        if last != Some(k) {
            cases[i].lock();
            last = Some(k);
        }
    }
}

/// Unlocks what [`sellock`] locked (Go's `selunlock`).
///
/// # Safety
///
/// The channels are locked by the caller, with `sellock(cases, lockorder)`.
unsafe fn selunlock(cases: &[&mut dyn SelectCase], lockorder: &[usize]) {
    let mut last = None;
    for &i in lockorder.iter().rev() {
        let k = cases[i].key();
        if last != Some(k) {
            // SAFETY: the contract: each distinct channel is locked once.
            unsafe { cases[i].unlock() };
            last = Some(k);
        }
    }
}

/// Runs a select (Go's `selectgo`): the index of the case that ran, or
/// `None` if `block` is false and none could.
fn selectgo(cases: &mut [&mut dyn SelectCase], block: bool) -> Option<usize> {
    let n = cases.len();
    if n == 0 {
        if block {
            // Go's `select {}`: nothing can ever wake this waiter.
            Waiter::new().block(WaitReason::SelectNoCases, || {});
            unreachable!("gokernel::select: an empty select was woken");
        }
        return None;
    }
    // A random permutation (Fisher–Yates), so every ready case is equally
    // likely to be the first one seen.
    let mut pollorder: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (cheaprand() % (i as u64 + 1)) as usize;
        pollorder.swap(i, j);
    }
    // The lock order is the poll order sorted by channel, stably (Go
    // builds it from `pollorder` with a heap sort): cases on the same
    // channel keep their random relative order. Pass 2 queues the sudogs
    // in this order, and a partner that comes later takes the first one
    // queued, so several cases on one channel each fire with equal odds
    // (Go's TestPseudoRandomSend) instead of always the first written.
    let mut lockorder = pollorder.clone();
    lockorder.sort_by_key(|&i| cases[i].key());

    sellock(cases, &lockorder);
    // Pass 1: a case that can proceed now.
    for &i in &pollorder {
        // SAFETY: every channel is locked.
        if let Some(wakeup) = unsafe { cases[i].poll_locked() } {
            // SAFETY: locked by sellock above.
            unsafe { selunlock(cases, &lockorder) };
            if let Some(w) = wakeup {
                w.wake();
            }
            return Some(i);
        }
    }
    if !block {
        // SAFETY: locked by sellock above.
        unsafe { selunlock(cases, &lockorder) };
        return None;
    }
    // Pass 2: wait on every channel at once.
    let waiter = Waiter::new();
    // SAFETY: every channel is locked.
    if cases.iter().any(|c| unsafe { c.shared_locked() }) {
        waiter.set_external();
    }
    for &i in &lockorder {
        // SAFETY: every channel is locked; the cases are borrowed by the
        // caller for the whole call, so they stay put.
        unsafe { cases[i].enqueue_locked(&waiter, i) };
    }
    {
        let cases: &[&mut dyn SelectCase] = cases;
        // SAFETY: locked by sellock above; released once we are parked.
        waiter.block(WaitReason::Select, || unsafe {
            selunlock(cases, &lockorder)
        });
    }
    // Pass 3: the case that fired was taken off its queue by whoever
    // completed it; take the others off theirs.
    let fired = waiter.fired();
    sellock(cases, &lockorder);
    for (i, case) in cases.iter_mut().enumerate() {
        if i != fired {
            // SAFETY: every channel is locked.
            unsafe { case.dequeue_locked() };
        }
    }
    // SAFETY: locked by sellock just above.
    unsafe { selunlock(cases, &lockorder) };
    cases[fired].fired(waiter.success());
    Some(fired)
}

/// Waits on several channel operations at once and runs the one that
/// proceeds (Go's `select` statement); see the [`select`](mod@crate::select)
/// module for the syntax.
///
/// ```
/// use gokernel::{chan, select};
/// # gokernel::Runtime::builder().procs(2).build().unwrap().block_on(|| {
/// let (data, quit) = (chan::<u64>(0), chan::<()>(0));
/// let (d, q) = (data.clone(), quit.clone());
/// gokernel::go(move || {
///     for i in 1..=10 {
///         d.send(i).unwrap();
///     }
///     q.close().unwrap();
/// });
/// let mut sum = 0;
/// loop {
///     select! {
///         recv(data) -> v => sum += v.unwrap(),
///         recv(quit) -> _closed => break,
///     }
/// }
/// assert_eq!(sum, 55);
/// # }).unwrap();
/// ```
#[macro_export]
macro_rules! select {
    ($($cases:tt)*) => {
        $crate::__select_parse!([] () $($cases)*)
    };
}

/// Parses `select!` cases, giving each its own hygienic variable.
#[doc(hidden)]
#[macro_export]
macro_rules! __select_parse {
    // All cases parsed.
    ([$($cases:tt)*] ($($default:tt)*)) => {
        $crate::__select_emit!([$($cases)*] ($($default)*))
    };
    // recv(ch) -> pat => body
    ([$($cases:tt)*] $default:tt recv($ch:expr) -> $p:pat => $body:block , $($rest:tt)*) => {
        $crate::__select_parse!([$($cases)* [recv case ($ch) () ($p) ($body)]] $default $($rest)*)
    };
    ([$($cases:tt)*] $default:tt recv($ch:expr) -> $p:pat => $body:block $($rest:tt)*) => {
        $crate::__select_parse!([$($cases)* [recv case ($ch) () ($p) ($body)]] $default $($rest)*)
    };
    ([$($cases:tt)*] $default:tt recv($ch:expr) -> $p:pat => $body:expr , $($rest:tt)*) => {
        $crate::__select_parse!([$($cases)* [recv case ($ch) () ($p) ($body)]] $default $($rest)*)
    };
    ([$($cases:tt)*] $default:tt recv($ch:expr) -> $p:pat => $body:expr) => {
        $crate::__select_parse!([$($cases)* [recv case ($ch) () ($p) ($body)]] $default)
    };
    // send(ch, value) -> pat => body
    ([$($cases:tt)*] $default:tt send($ch:expr, $v:expr) -> $p:pat => $body:block , $($rest:tt)*) => {
        $crate::__select_parse!([$($cases)* [send case ($ch) ($v) ($p) ($body)]] $default $($rest)*)
    };
    ([$($cases:tt)*] $default:tt send($ch:expr, $v:expr) -> $p:pat => $body:block $($rest:tt)*) => {
        $crate::__select_parse!([$($cases)* [send case ($ch) ($v) ($p) ($body)]] $default $($rest)*)
    };
    ([$($cases:tt)*] $default:tt send($ch:expr, $v:expr) -> $p:pat => $body:expr , $($rest:tt)*) => {
        $crate::__select_parse!([$($cases)* [send case ($ch) ($v) ($p) ($body)]] $default $($rest)*)
    };
    ([$($cases:tt)*] $default:tt send($ch:expr, $v:expr) -> $p:pat => $body:expr) => {
        $crate::__select_parse!([$($cases)* [send case ($ch) ($v) ($p) ($body)]] $default)
    };
    // default => body
    ([$($cases:tt)*] () default => $body:block , $($rest:tt)*) => {
        $crate::__select_parse!([$($cases)*] (($body)) $($rest)*)
    };
    ([$($cases:tt)*] () default => $body:block $($rest:tt)*) => {
        $crate::__select_parse!([$($cases)*] (($body)) $($rest)*)
    };
    ([$($cases:tt)*] () default => $body:expr , $($rest:tt)*) => {
        $crate::__select_parse!([$($cases)*] (($body)) $($rest)*)
    };
    ([$($cases:tt)*] () default => $body:expr) => {
        $crate::__select_parse!([$($cases)*] (($body)))
    };
    ([$($cases:tt)*] ($($d:tt)+) default => $($rest:tt)*) => {
        ::core::compile_error!("select!: more than one `default` case")
    };
    ([$($cases:tt)*] $default:tt $($rest:tt)+) => {
        ::core::compile_error!(
            "select!: expected `recv(ch) -> pat => body`, `send(ch, value) -> pat => body` or `default => body`"
        )
    };
}

/// Emits a parsed `select!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __select_emit {
    ([$([$kind:ident $case:ident $ch:tt $v:tt $p:tt $body:tt])*] ($($default:tt)?)) => {{
        // A reference first, so that a temporary channel (`after(d)`) lives
        // as long as the select.
        $(
            let $case = &$ch;
            let mut $case = $crate::__select_case!($kind $case $v);
        )*
        let __select = $crate::select::Select::new();
        $( let __select = __select.case(&mut $case); )*
        let __fired: ::core::option::Option<usize> = $crate::__select_wait!(__select $($default)?);
        $(
            if __fired == ::core::option::Option::Some($case.index()) {
                let $p = $case.finish();
                $body
            } else
        )*
        {
            $crate::__select_default!($($default)?)
        }
    }};
}

/// Makes one `select!` case.
#[doc(hidden)]
#[macro_export]
macro_rules! __select_case {
    (recv $ch:ident ()) => {
        $crate::select::RecvCase::new($ch)
    };
    (send $ch:ident ($v:expr)) => {
        $crate::select::SendCase::new($ch, $v)
    };
}

/// Waits, or not when there is a `default`.
#[doc(hidden)]
#[macro_export]
macro_rules! __select_wait {
    ($sel:ident) => {
        ::core::option::Option::Some($sel.wait())
    };
    ($sel:ident $default:tt) => {
        $sel.try_wait()
    };
}

/// The `default` body, or nothing (a waiting select always fires a case).
#[doc(hidden)]
#[macro_export]
macro_rules! __select_default {
    () => {
        ::core::unreachable!("select!: no case fired")
    };
    ($body:tt) => {
        $body
    };
}
