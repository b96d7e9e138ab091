//! Channels (Go's `chan.go`: `makechan`, `chansend`, `chanrecv`,
//! `closechan`).
//!
//! A [`Chan<T>`] is Go's `chan T`: a handle that can both send and
//! receive, cloned to share. With capacity 0 it is a rendezvous: a send
//! waits for a receiver and hands its value straight over. With capacity
//! `n` up to `n` values wait in a buffer.
//!
//! ```
//! # gokernel::Runtime::builder().procs(2).build().unwrap().block_on(|| {
//! let ch = gokernel::chan::<u32>(0);
//! let tx = ch.clone();
//! gokernel::go(move || {
//!     for i in 0..3 {
//!         tx.send(i).unwrap();
//!     }
//!     tx.close().unwrap();
//! });
//! let got: Vec<u32> = ch.iter().collect(); // until closed and drained
//! assert_eq!(got, [0, 1, 2]);
//! # }).unwrap();
//! ```
//!
//! # How it works
//!
//! One lock guards the buffer, the closed flag and two wait queues of
//! [`Sudog`]s, `recvq` and `sendq` (see [`sema`](crate::sema) for how a
//! waiter blocks and is woken). Either queue is empty, or the buffer is
//! (receivers wait only on an empty buffer, senders only on a full one):
//!
//! - a send that finds a waiting receiver moves its value straight into the
//!   receiver's slot and wakes it — no trip through the buffer;
//! - a receive that finds a waiting sender takes the sender's value (cap 0),
//!   or the buffer's oldest value while the sender's value takes its place
//!   at the back (cap > 0), and wakes the sender;
//! - otherwise the buffer is used, or the caller blocks with a sudog on
//!   the queue, and the lock is released only once it is parked.
//!
//! `close` wakes every waiter: receivers see "closed", senders get their
//! value back in a [`SendError`]. A goroutine blocks by parking; a plain
//! thread (not a goroutine) blocks its thread, so channels connect
//! goroutines with the rest of a program. (A goroutine that waits for a
//! plain thread should not be the main goroutine of
//! `Runtime::block_on`, which reports a
//! deadlock when every goroutine waits; run it with `spawn` and `join`.)

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use core::cell::UnsafeCell;

use crate::runtime2::WaitReason;
use crate::sema::{SpinLock, Sudog, WaitQ, Wakeup};

/// A channel of `T` values (Go's `chan T`); see the [module docs](self).
///
/// Cloning makes another handle to the same channel. The channel is freed
/// with its last handle (values still buffered are dropped then).
///
/// ```
/// use gokernel::chan;
/// # gokernel::Runtime::builder().procs(2).build().unwrap().block_on(|| {
/// let jobs = chan::<u32>(3); // room for three
/// let done = chan::<u32>(0); // unbuffered: a send waits for a receiver
/// let (j, d) = (jobs.clone(), done.clone());
/// gokernel::go(move || {
///     let sum: u32 = j.iter().sum(); // receives until closed and drained
///     d.send(sum).unwrap();
/// });
/// for i in 1..=3 {
///     jobs.send(i).unwrap();
/// }
/// jobs.close().unwrap();
/// assert_eq!(done.recv(), Ok(6));
/// assert!(jobs.send(4).is_err()); // closed: the value comes back
/// # }).unwrap();
/// ```
pub struct Chan<T> {
    c: Arc<Hchan<T>>,
}

impl<T> Clone for Chan<T> {
    fn clone(&self) -> Self {
        Chan { c: self.c.clone() }
    }
}

/// The channel itself (Go's `hchan`).
pub(crate) struct Hchan<T> {
    lock: SpinLock,
    cap: usize,
    st: UnsafeCell<State<T>>,
}

/// What the lock guards.
struct State<T> {
    buf: VecDeque<T>,
    closed: bool,
    /// Blocked receivers (only while `buf` is empty).
    recvq: WaitQ,
    /// Blocked senders (only while `buf` is full).
    sendq: WaitQ,
}

// SAFETY: the state is only touched under `lock`; values of T move between
// threads (hence T: Send), and are never shared.
unsafe impl<T: Send> Send for Hchan<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Hchan<T> {}

/// Makes a channel with room for `cap` values (Go's `make(chan T, cap)`):
/// 0 makes an unbuffered channel.
///
/// # Panics
///
/// If the buffer cannot be allocated (`cap` too large), with a message
/// naming the capacity.
///
/// ```
/// let c = gokernel::chan::<&str>(1);
/// c.send("buffered").unwrap(); // room for one: no receiver needed
/// assert_eq!(c.try_send("full"), Err(gokernel::TrySendError::Full("full")));
/// assert_eq!(c.recv(), Ok("buffered"));
/// ```
///
#[track_caller]
pub fn chan<T: Send>(cap: usize) -> Chan<T> {
    makechan(cap)
}

/// [`chan`] under Go's name.
#[track_caller]
fn makechan<T: Send>(cap: usize) -> Chan<T> {
    let mut buf = VecDeque::new();
    if buf.try_reserve_exact(cap).is_err() {
        panic!(
            "gokernel::chan: a buffer of {cap} values of {} bytes does not fit in memory",
            core::mem::size_of::<T>()
        );
    }
    let c = Arc::new(Hchan {
        lock: SpinLock::new(),
        cap,
        st: UnsafeCell::new(State {
            buf,
            closed: false,
            recvq: WaitQ::new(),
            sendq: WaitQ::new(),
        }),
    });
    // Made counts as used: a channel made on a plain thread (and handed
    // to goroutines) is shared from the start, one made in a goroutine
    // belongs to its runtime until another uses it.
    c.lock.note();
    Chan { c }
}

/// `send` on a closed channel: the value comes back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SendError<T>(pub T);

/// Why [`Chan::try_send`] did not send; the value comes back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The buffer is full (or, unbuffered, no receiver is waiting).
    Full(T),
    /// The channel is closed.
    Closed(T),
}

/// `recv` on a channel that is closed and drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvError;

/// Why [`Chan::try_recv`] got no value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing buffered and no sender waiting.
    Empty,
    /// The channel is closed and drained.
    Closed,
}

/// `close` on a channel that was already closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseError;

impl<T> core::fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SendError(..)")
    }
}

impl<T> core::fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("Full(..)"),
            TrySendError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

impl<T> core::fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("send on closed channel")
    }
}

impl<T> core::fmt::Display for TrySendError<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("channel full"),
            TrySendError::Closed(_) => f.write_str("send on closed channel"),
        }
    }
}

impl core::fmt::Display for RecvError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("receive on closed and empty channel")
    }
}

impl core::fmt::Display for TryRecvError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TryRecvError::Empty => f.write_str("channel empty"),
            TryRecvError::Closed => f.write_str("receive on closed and empty channel"),
        }
    }
}

impl core::fmt::Display for CloseError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("close of closed channel")
    }
}

impl<T> core::error::Error for SendError<T> {}
impl<T> core::error::Error for TrySendError<T> {}
impl core::error::Error for RecvError {}
impl core::error::Error for TryRecvError {}
impl core::error::Error for CloseError {}

/// How a send went, under the lock.
pub(crate) enum SendStep<T> {
    /// Sent; wake this receiver (after unlocking) if any.
    Done(Option<Wakeup>),
    /// Would block: the value comes back.
    Full(T),
    /// Closed: the value comes back.
    Closed(T),
}

/// How a receive went, under the lock.
pub(crate) enum RecvStep<T> {
    /// Got a value; wake this sender (after unlocking) if any.
    Done(T, Option<Wakeup>),
    /// Would block.
    Empty,
    /// Closed and drained.
    Closed,
}

impl<T: Send> Hchan<T> {
    /// Takes the channel's lock.
    pub(crate) fn lock(&self) {
        self.lock.lock();
    }

    /// True if another runtime or a plain thread has used the channel
    /// (see [`SpinLock::shared`]).
    pub(crate) fn shared(&self) -> bool {
        self.lock.shared()
    }

    /// Releases the channel's lock.
    ///
    /// # Safety
    ///
    /// The caller holds it.
    pub(crate) unsafe fn unlock(&self) {
        // SAFETY: the contract.
        unsafe { self.lock.unlock() };
    }

    /// The locked state.
    ///
    /// # Safety
    ///
    /// Under the lock, and no other reference to the state is live.
    #[allow(clippy::mut_from_ref)]
    unsafe fn state(&self) -> &mut State<T> {
        // SAFETY: the contract.
        unsafe { &mut *self.st.get() }
    }

    /// One send step that does not block (the heart of Go's `chansend`).
    ///
    /// # Safety
    ///
    /// Under the lock.
    pub(crate) unsafe fn send_locked(&self, v: T) -> SendStep<T> {
        // SAFETY: the contract.
        let st = unsafe { self.state() };
        if st.closed {
            return SendStep::Closed(v);
        }
        // SAFETY: under the lock.
        if let Some((sg, wakeup)) = unsafe { st.recvq.dequeue() } {
            // A receiver is parked: straight into its slot.
            // SAFETY: a receiver's sudog points at its `Option<T>` slot
            // and is ours (claimed) until we wake it.
            unsafe {
                *(*sg).elem.cast::<Option<T>>() = Some(v);
                (*(*sg).waiter).complete((*sg).case, true);
            }
            return SendStep::Done(Some(wakeup));
        }
        if st.buf.len() < self.cap {
            st.buf.push_back(v);
            return SendStep::Done(None);
        }
        SendStep::Full(v)
    }

    /// One receive step that does not block (the heart of Go's
    /// `chanrecv`).
    ///
    /// # Safety
    ///
    /// Under the lock.
    pub(crate) unsafe fn recv_locked(&self) -> RecvStep<T> {
        // SAFETY: the contract.
        let st = unsafe { self.state() };
        // SAFETY: under the lock.
        if let Some((sg, wakeup)) = unsafe { st.sendq.dequeue() } {
            // A sender is parked, so the buffer is full (or there is none).
            // SAFETY: a sender's sudog points at its `Option<T>` holding
            // the value, and is ours (claimed) until we wake it.
            let sv = unsafe {
                (*(*sg).waiter).complete((*sg).case, true);
                (*(*sg).elem.cast::<Option<T>>())
                    .take()
                    .expect("gokernel: a blocked sender without a value")
            };
            let v = match st.buf.pop_front() {
                // The oldest value is ours; the sender's joins the back.
                Some(head) => {
                    st.buf.push_back(sv);
                    head
                }
                None => sv,
            };
            return RecvStep::Done(v, Some(wakeup));
        }
        if let Some(v) = st.buf.pop_front() {
            return RecvStep::Done(v, None);
        }
        if st.closed {
            return RecvStep::Closed;
        }
        RecvStep::Empty
    }

    /// Queues a blocked sender's sudog.
    ///
    /// # Safety
    ///
    /// Under the lock; as [`WaitQ::enqueue`].
    pub(crate) unsafe fn enqueue_send(&self, sg: *mut Sudog) {
        // SAFETY: the contract.
        unsafe { self.state().sendq.enqueue(sg, &self.lock) };
    }

    /// Queues a blocked receiver's sudog.
    ///
    /// # Safety
    ///
    /// Under the lock; as [`WaitQ::enqueue`].
    pub(crate) unsafe fn enqueue_recv(&self, sg: *mut Sudog) {
        // SAFETY: the contract.
        unsafe { self.state().recvq.enqueue(sg, &self.lock) };
    }

    /// Takes a sender's sudog off the queue if it is still there.
    ///
    /// # Safety
    ///
    /// Under the lock; as [`WaitQ::remove`].
    pub(crate) unsafe fn dequeue_send(&self, sg: *mut Sudog) {
        // SAFETY: the contract.
        unsafe { self.state().sendq.remove(sg) };
    }

    /// Takes a receiver's sudog off the queue if it is still there.
    ///
    /// # Safety
    ///
    /// Under the lock; as [`WaitQ::remove`].
    pub(crate) unsafe fn dequeue_recv(&self, sg: *mut Sudog) {
        // SAFETY: the contract.
        unsafe { self.state().recvq.remove(sg) };
    }
}

impl<T: Send> Chan<T> {
    /// The shared channel.
    pub(crate) fn hchan(&self) -> &Hchan<T> {
        &self.c
    }

    /// An address that identifies the channel (`select` locks channels in
    /// this order).
    pub(crate) fn key(&self) -> usize {
        Arc::as_ptr(&self.c) as usize
    }

    /// Sends `v`, waiting for room (or, unbuffered, for a receiver)
    /// (Go's `c <- v`). On a closed channel — also one closed while this
    /// send waited — the value comes back in the error.
    ///
    /// # Errors
    ///
    /// [`SendError`] with the value, if the channel is closed.
    pub fn send(&self, v: T) -> Result<(), SendError<T>> {
        chansend(self.hchan(), v, true).map_err(|e| match e {
            TrySendError::Full(v) | TrySendError::Closed(v) => SendError(v),
        })
    }

    /// Sends `v` if that can be done without waiting.
    ///
    /// # Errors
    ///
    /// [`TrySendError::Full`] (with the value) if that would wait,
    /// [`TrySendError::Closed`] if the channel is closed.
    pub fn try_send(&self, v: T) -> Result<(), TrySendError<T>> {
        chansend(self.hchan(), v, false)
    }

    /// Receives a value, waiting for one (Go's `v, ok := <-c`). A closed
    /// channel still gives its buffered values, in order, then
    /// [`RecvError`].
    ///
    /// # Errors
    ///
    /// [`RecvError`] once the channel is closed and drained.
    pub fn recv(&self) -> Result<T, RecvError> {
        chanrecv(self.hchan(), true).map_err(|_| RecvError)
    }

    /// Receives a value if one is there without waiting.
    ///
    /// # Errors
    ///
    /// [`TryRecvError::Empty`] if that would wait, [`TryRecvError::Closed`]
    /// once the channel is closed and drained.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        chanrecv(self.hchan(), false)
    }

    /// Closes the channel (Go's `close(c)`): waiting receivers wake with
    /// [`RecvError`] (once the buffer is drained), waiting senders with
    /// their value back. Closing twice is an error.
    ///
    /// # Errors
    ///
    /// [`CloseError`] if the channel was already closed.
    pub fn close(&self) -> Result<(), CloseError> {
        closechan(self.hchan())
    }

    /// Reads the channel's state under its lock.
    fn peek<R>(&self, f: impl FnOnce(&State<T>) -> R) -> R {
        let c = self.hchan();
        c.lock();
        // SAFETY: under the lock, and only for the call.
        let r = f(unsafe { c.state() });
        // SAFETY: we hold the lock.
        unsafe { c.unlock() };
        r
    }

    /// Values in the buffer now (Go's `len(c)`).
    pub fn len(&self) -> usize {
        self.peek(|st| st.buf.len())
    }

    /// True if no value is buffered now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer's capacity (Go's `cap(c)`); 0 for a rendezvous channel.
    pub fn cap(&self) -> usize {
        self.c.cap
    }

    /// True once [`close`](Self::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.peek(|st| st.closed)
    }

    /// Receives until the channel is closed and drained (Go's
    /// `for v := range c`).
    pub fn iter(&self) -> Iter<'_, T> {
        Iter { ch: self }
    }
}

impl<T> core::fmt::Debug for Chan<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Chan")
            .field("cap", &self.c.cap)
            .finish_non_exhaustive()
    }
}

/// The values of a channel until it is closed and drained
/// ([`Chan::iter`]).
pub struct Iter<'a, T> {
    ch: &'a Chan<T>,
}

impl<T: Send> Iterator for Iter<'_, T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        self.ch.recv().ok()
    }
}

impl<'a, T: Send> IntoIterator for &'a Chan<T> {
    type Item = T;
    type IntoIter = Iter<'a, T>;
    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

/// Sends `v` on `c`, waiting if `block` (Go's `chansend`).
fn chansend<T: Send>(c: &Hchan<T>, v: T, block: bool) -> Result<(), TrySendError<T>> {
    c.lock();
    // SAFETY: under the lock.
    let v = match unsafe { c.send_locked(v) } {
        SendStep::Done(wakeup) => {
            // SAFETY: we hold the lock.
            unsafe { c.unlock() };
            if let Some(w) = wakeup {
                w.wake();
            }
            return Ok(());
        }
        SendStep::Closed(v) => {
            // SAFETY: we hold the lock.
            unsafe { c.unlock() };
            return Err(TrySendError::Closed(v));
        }
        SendStep::Full(v) => v,
    };
    if !block {
        // SAFETY: we hold the lock.
        unsafe { c.unlock() };
        return Err(TrySendError::Full(v));
    }
    let mut slot = Some(v);
    // SAFETY: we hold the channel's lock, which guards sendq; receivers
    // take a sender's value from an `Option<T>`.
    let sent = unsafe {
        let q = &raw mut (*c.st.get()).sendq;
        WaitQ::wait(
            q,
            &c.lock,
            (&mut slot as *mut Option<T>).cast(),
            false,
            WaitReason::ChanSend,
        )
    };
    if sent {
        Ok(())
    } else {
        // Closed while we waited: the value is still ours.
        Err(TrySendError::Closed(
            slot.expect("gokernel: a send failed but its value is gone"),
        ))
    }
}

/// Receives from `c`, waiting if `block` (Go's `chanrecv`).
fn chanrecv<T: Send>(c: &Hchan<T>, block: bool) -> Result<T, TryRecvError> {
    c.lock();
    // SAFETY: under the lock.
    match unsafe { c.recv_locked() } {
        RecvStep::Done(v, wakeup) => {
            // SAFETY: we hold the lock.
            unsafe { c.unlock() };
            if let Some(w) = wakeup {
                w.wake();
            }
            return Ok(v);
        }
        RecvStep::Closed => {
            // SAFETY: we hold the lock.
            unsafe { c.unlock() };
            return Err(TryRecvError::Closed);
        }
        RecvStep::Empty => {}
    }
    if !block {
        // SAFETY: we hold the lock.
        unsafe { c.unlock() };
        return Err(TryRecvError::Empty);
    }
    let mut slot: Option<T> = None;
    // SAFETY: we hold the channel's lock, which guards recvq; senders
    // fill a receiver's `Option<T>`.
    let got = unsafe {
        let q = &raw mut (*c.st.get()).recvq;
        WaitQ::wait(
            q,
            &c.lock,
            (&mut slot as *mut Option<T>).cast(),
            false,
            WaitReason::ChanReceive,
        )
    };
    if got {
        Ok(slot.expect("gokernel: a receive succeeded without a value"))
    } else {
        Err(TryRecvError::Closed)
    }
}

/// Closes `c` and wakes everyone waiting on it (Go's `closechan`).
fn closechan<T: Send>(c: &Hchan<T>) -> Result<(), CloseError> {
    c.lock();
    // SAFETY: under the lock.
    let st = unsafe { c.state() };
    if st.closed {
        // SAFETY: we hold the lock.
        unsafe { c.unlock() };
        return Err(CloseError);
    }
    st.closed = true;
    // SAFETY: under the lock.
    let (receivers, senders) =
        unsafe { (st.recvq.dequeue_all(false), st.sendq.dequeue_all(false)) };
    // SAFETY: we hold the lock.
    unsafe { c.unlock() };
    for w in receivers.into_iter().chain(senders) {
        w.wake();
    }
    Ok(())
}
