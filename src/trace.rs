//! The execution trace (Go's `trace.go`, much reduced): scheduler events
//! — goroutine create, start, stop (a yield), block (with its wait
//! reason), unblock (with the waker), end; steals; P start and stop;
//! timer fires — recorded into per-P buffers while tracing is on, and
//! exported as Chrome trace-event JSON, which Perfetto's UI
//! (<https://ui.perfetto.dev>) and `chrome://tracing` open: a lane per P,
//! each goroutine's run a slice on it, a wake-up an arrow from the waker
//! to where the woken goroutine next runs. `cargo xtask trace FILE` draws
//! the same as an SVG picture.
//!
//! Hosted: `Builder::trace` or
//! `GOKERNEL_TRACE=FILE` writes the JSON when the runtime is dropped;
//! `Runtime::trace_json` returns it at any
//! time. Bare metal: [`Sched::start_trace`], then [`Sched::trace_events`]
//! (the raw events, e.g. to send over a serial line) or
//! [`Sched::trace_json`].
//!
//! # The `trace` feature, and the cost
//!
//! The hooks exist only with the crate's `trace` cargo feature
//! ([`ENABLED`]); without it they are compiled out, costing nothing, and a
//! trace asked for stays empty (the hosted runtime says so on stderr).
//! With the feature and no trace started, each hook is one load of a
//! process-wide count and a branch not taken (about 18 instructions per
//! hand-off between two goroutines, +6 %). On, an event is a TSC read and a push under its P's lock (only
//! the P's owner takes it, so it is uncontended; events from a thread
//! without a P go to a shared buffer). A buffer holds at most
//! [`MAX_EVENTS_PER_BUFFER`] events; later ones are counted as dropped.

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::runtime2::{G, M, P, Sched, WaitReason};
use crate::tls::getg;

/// Schedulers tracing now, in the whole process: the hooks' one check.
static TRACING: AtomicUsize = AtomicUsize::new(0);

/// Whether this build records traces (the `trace` cargo feature).
pub const ENABLED: bool = cfg!(feature = "trace");

/// The most events one buffer keeps (32 bytes each: 32 MiB per P).
pub const MAX_EVENTS_PER_BUFFER: usize = 1 << 20;

/// What happened.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Goroutine `g` was created by goroutine `arg` (0: from a thread).
    GoCreate,
    /// Goroutine `g` started or resumed running on the P.
    GoStart,
    /// Goroutine `g` yielded (`gosched`): runnable again.
    GoStop,
    /// Goroutine `g` parked; `arg` is its [`WaitReason`] (`as u8`).
    GoBlock,
    /// Goroutine `g` was made runnable by goroutine `arg` (0: by a thread
    /// or a timer).
    GoUnblock,
    /// Goroutine `g` finished.
    GoEnd,
    /// The P stole `arg` goroutines from P `g`.
    Steal,
    /// An M took the P.
    ProcStart,
    /// The M let the P go.
    ProcStop,
    /// A timer fired; `g` is the goroutine it readies (0: a callback).
    TimerFire,
    /// Goroutine `g` entered a blocking system call (its P may be handed
    /// off).
    SyscallEnter,
    /// Goroutine `g` came back from one.
    SyscallExit,
}

impl EventKind {
    /// The event's name in the JSON (Go's trace names, where Go has one).
    pub const fn name(self) -> &'static str {
        match self {
            EventKind::GoCreate => "GoCreate",
            EventKind::GoStart => "GoStart",
            EventKind::GoStop => "GoStop",
            EventKind::GoBlock => "GoBlock",
            EventKind::GoUnblock => "GoUnblock",
            EventKind::GoEnd => "GoEnd",
            EventKind::Steal => "Steal",
            EventKind::ProcStart => "ProcStart",
            EventKind::ProcStop => "ProcStop",
            EventKind::TimerFire => "TimerFire",
            EventKind::SyscallEnter => "SyscallEnter",
            EventKind::SyscallExit => "SyscallExit",
        }
    }
}

/// One recorded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// When, in CPU ticks (see [`Sched::trace_events`] for nanoseconds).
    pub ticks: u64,
    /// The goroutine (or, for `Steal`, the victim P).
    pub g: u64,
    /// The kind's argument (see [`EventKind`]).
    pub arg: u64,
    /// What happened.
    pub kind: EventKind,
    /// The P whose buffer holds it; `None`: recorded without a P.
    pub p: Option<u32>,
}

/// A scheduler's trace buffers: one per P, and one for events recorded
/// without a P.
#[derive(Default)]
pub struct SchedTrace {
    bufs: spin::Once<Bufs>,
}

/// Events recorded into one buffer: filled chunks and the one being
/// filled. Chunks are never grown, so recording never copies old events.
#[derive(Default)]
struct Buf {
    full: Vec<Vec<Event>>,
    cur: Vec<Event>,
    len: usize,
}

/// Events per chunk (128 KiB).
const CHUNK: usize = 4096;

impl Buf {
    fn push(&mut self, e: Event) {
        if self.cur.len() == self.cur.capacity() {
            let full = core::mem::replace(&mut self.cur, Vec::with_capacity(CHUNK));
            if !full.is_empty() {
                self.full.push(full);
            }
        }
        self.cur.push(e);
        self.len += 1;
    }

    fn copy_into(&self, out: &mut Vec<Event>) {
        for c in &self.full {
            out.extend_from_slice(c);
        }
        out.extend_from_slice(&self.cur);
    }
}

struct Bufs {
    per_p: Vec<spin::Mutex<Buf>>,
    no_p: spin::Mutex<Buf>,
    dropped: AtomicU64,
    /// The ticks/nanoseconds pair the trace starts at.
    start: (u64, u64),
}

impl SchedTrace {
    fn get(&self) -> Option<&Bufs> {
        self.bufs.get()
    }
}

impl Drop for SchedTrace {
    fn drop(&mut self) {
        if self.bufs.get().is_some() {
            TRACING.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Sched {
    /// Starts recording this scheduler's events (once: later calls do
    /// nothing). Until then, and for schedulers that never start, the
    /// hooks cost one load and a branch. Without the `trace` feature
    /// ([`ENABLED`]) nothing is recorded.
    ///
    /// ```
    /// use gokernel::platform::hosted::HOSTED;
    /// use gokernel::runtime2::Sched;
    /// use gokernel::trace::EventKind;
    ///
    /// let sched = Sched::new(1, gokernel::stack::STACK_MIN, &HOSTED);
    /// sched.start_trace();
    /// sched.go(Box::new(|| {})).unwrap();
    /// while sched.ngoroutines() != 0 {
    ///     std::thread::yield_now();
    /// }
    /// let kinds: Vec<_> = sched.trace_events().iter().map(|e| e.kind).collect();
    /// if gokernel::trace::ENABLED {
    ///     assert!(kinds.contains(&EventKind::GoCreate) && kinds.contains(&EventKind::GoEnd));
    /// }
    /// # sched.shutdown();
    /// ```
    pub fn start_trace(&self) {
        let mut started = false;
        self.trace.bufs.call_once(|| {
            started = true;
            Bufs {
                per_p: (0..self.procs())
                    .map(|_| spin::Mutex::new(Buf::default()))
                    .collect(),
                no_p: spin::Mutex::new(Buf::default()),
                dropped: AtomicU64::new(0),
                start: (crate::traceback::cputicks(), self.platform.nanotime()),
            }
        });
        if started {
            TRACING.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether this scheduler records a trace.
    pub fn tracing(&self) -> bool {
        self.trace.get().is_some()
    }

    /// A copy of the events recorded so far, in time order (each buffer is
    /// in order; buffers are merged by time stamp). Empty if the trace was
    /// never started.
    pub fn trace_events(&self) -> Vec<Event> {
        let Some(b) = self.trace.get() else {
            return Vec::new();
        };
        let mut all: Vec<Event> = Vec::new();
        b.no_p.lock().copy_into(&mut all);
        for buf in &b.per_p {
            buf.lock().copy_into(&mut all);
        }
        all.sort_by_key(|e| e.ticks);
        all
    }

    /// Events not recorded because a buffer was full.
    pub fn trace_dropped(&self) -> u64 {
        self.trace
            .get()
            .map_or(0, |b| b.dropped.load(Ordering::Relaxed))
    }

    /// The trace as Chrome trace-event JSON (see the [module
    /// docs](crate::trace)); `None` if it was never started.
    pub fn trace_json(&self) -> Option<String> {
        let b = self.trace.get()?;
        let events = self.trace_events();
        let (t0, n0) = b.start;
        // Ticks to microseconds, at the rate measured over the trace so far.
        let (t1, n1) = (crate::traceback::cputicks(), self.platform.nanotime());
        let per_tick_us = if t1 > t0 {
            (n1.saturating_sub(n0)) as f64 / (t1 - t0) as f64 / 1000.0
        } else {
            0.0
        };
        let us = |ticks: u64| ticks.saturating_sub(t0) as f64 * per_tick_us;
        Some(chrome_json(&events, self.procs(), us))
    }
}

/// The Chrome trace-event JSON for `events` of a scheduler with `procs`
/// Ps; `us` turns ticks into microseconds.
fn chrome_json(events: &[Event], procs: usize, us: impl Fn(u64) -> f64) -> String {
    use core::fmt::Write;
    let mut out = String::from("{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n");
    // Lanes: tid p for P p, tid procs for "no P".
    let _ = write!(
        out,
        "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":1,\"tid\":0,\"args\":{{\"name\":\"gokernel\"}}}}"
    );
    for p in 0..=procs {
        let name = if p == procs {
            String::from("no P")
        } else {
            alloc::format!("P{p}")
        };
        let _ = write!(
            out,
            ",\n{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":{p},\"args\":{{\"name\":\"{name}\"}}}}"
        );
    }
    let lane = |e: &Event| e.p.map_or(procs, |p| p as usize);
    // Running slices: GoStart on a P until that goroutine's next stop,
    // block or end on the same P.
    let mut open: Vec<(usize, u64, u64)> = Vec::new(); // (lane, goid, start ticks)
    // Pending wake-ups: goid -> flow id, waiting for its next GoStart.
    let mut wakes: Vec<(u64, u64)> = Vec::new();
    let mut flow = 0u64;
    for e in events {
        let l = lane(e);
        let t = us(e.ticks);
        // Every raw event, as an instant, in order.
        let _ = write!(
            out,
            ",\n{{\"name\":\"{}\",\"cat\":\"event\",\"ph\":\"i\",\"s\":\"t\",\"pid\":1,\"tid\":{l},\"ts\":{t:.3},\"args\":{{\"g\":{},\"arg\":{}",
            e.kind.name(),
            e.g,
            e.arg
        );
        if e.kind == EventKind::GoBlock {
            let r = WaitReason::from_u8(e.arg as u8);
            let _ = write!(out, ",\"reason\":\"{r}\"");
        }
        out.push_str("}}");
        match e.kind {
            EventKind::GoStart => {
                open.push((l, e.g, e.ticks));
                if let Some(i) = wakes.iter().position(|&(g, _)| g == e.g) {
                    let (_, id) = wakes.swap_remove(i);
                    let _ = write!(
                        out,
                        ",\n{{\"name\":\"wakeup\",\"cat\":\"wakeup\",\"ph\":\"f\",\"bp\":\"e\",\"id\":{id},\"pid\":1,\"tid\":{l},\"ts\":{t:.3}}}"
                    );
                }
            }
            EventKind::GoStop | EventKind::GoBlock | EventKind::GoEnd => {
                if let Some(i) = open.iter().position(|&(ol, g, _)| ol == l && g == e.g) {
                    let (_, g, start) = open.swap_remove(i);
                    let how = match e.kind {
                        EventKind::GoBlock => WaitReason::from_u8(e.arg as u8).as_str(),
                        EventKind::GoStop => "yield",
                        _ => "end",
                    };
                    let s = us(start);
                    let _ = write!(
                        out,
                        ",\n{{\"name\":\"G{g}\",\"cat\":\"goroutine\",\"ph\":\"X\",\"pid\":1,\"tid\":{l},\"ts\":{s:.3},\"dur\":{:.3},\"args\":{{\"goid\":{g},\"until\":\"{how}\"}}}}",
                        (t - s).max(0.0)
                    );
                }
            }
            EventKind::GoUnblock => {
                flow += 1;
                wakes.retain(|&(g, _)| g != e.g);
                wakes.push((e.g, flow));
                let _ = write!(
                    out,
                    ",\n{{\"name\":\"wakeup\",\"cat\":\"wakeup\",\"ph\":\"s\",\"id\":{flow},\"pid\":1,\"tid\":{l},\"ts\":{t:.3}}}"
                );
            }
            _ => {}
        }
    }
    out.push_str("\n]}\n");
    out
}

// ---------------------------------------------------------------------
// The hooks. Each is inlined as a check of `TRACING`; the work is out of
// line.

/// Whether any scheduler traces (never, without the `trace` feature: the
/// hooks are compiled out).
#[inline(always)]
fn on() -> bool {
    ENABLED && TRACING.load(Ordering::Relaxed) != 0
}

/// Records `kind` for the scheduler of M `mp` (or of `gp`), in the buffer
/// of `pp` (null: the shared one).
#[cold]
#[inline(never)]
fn emit(sched: *const Sched, pp: *mut P, kind: EventKind, g: u64, arg: u64) {
    // SAFETY: callers pass a live scheduler or null.
    let Some(sched) = (unsafe { sched.as_ref() }) else {
        return;
    };
    let Some(b) = sched.trace.get() else {
        return;
    };
    // SAFETY: a P of this scheduler; its id never changes.
    let p = (!pp.is_null()).then(|| unsafe { (*pp).id } as u32);
    let buf = match p {
        Some(i) => &b.per_p[i as usize],
        None => &b.no_p,
    };
    let mut v = buf.lock();
    if v.len >= MAX_EVENTS_PER_BUFFER {
        b.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    v.push(Event {
        ticks: crate::traceback::cputicks(),
        g,
        arg,
        kind,
        p,
    });
}

/// The current M's P and the goid of the goroutine it runs (0 on g0 or
/// off any M).
fn here() -> (*mut P, u64) {
    let gp = getg();
    if gp.is_null() {
        return (core::ptr::null_mut(), 0);
    }
    // SAFETY: the current G's M is live; only this thread writes its p
    // and curg.
    unsafe {
        let mp = (*gp).m;
        if mp.is_null() {
            return (core::ptr::null_mut(), 0);
        }
        let cur = (*mp).curg;
        let id = if cur.is_null() { 0 } else { (*cur).goid() };
        ((*mp).p, id)
    }
}

/// A G of `sched` was made (`newproc1`).
#[inline(always)]
pub(crate) fn gocreate(sched: &Sched, gp: *mut G) {
    if on() {
        let (pp, creator) = here();
        // SAFETY: gp is new and ours.
        emit(
            sched,
            pp,
            EventKind::GoCreate,
            unsafe { (*gp).goid() },
            creator,
        );
    }
}

/// `gp` starts running on `mp` (`execute`).
///
/// # Safety
///
/// On `mp`'s g0; `gp` is the G it runs.
#[inline(always)]
pub(crate) unsafe fn gostart(mp: *mut M, gp: *mut G) {
    if on() {
        // SAFETY: the contract.
        unsafe { emit((*mp).rt, (*mp).p, EventKind::GoStart, (*gp).goid(), 0) };
    }
}

/// `gp` leaves its M: `kind` is `GoStop`, `GoBlock` or `GoEnd`.
///
/// # Safety
///
/// On the g0 of the M `gp` just left, which still holds its P (if any).
#[inline(always)]
pub(crate) unsafe fn gostop(mp: *mut M, gp: *mut G, kind: EventKind) {
    if on() {
        // SAFETY: the contract.
        unsafe {
            let arg = if kind == EventKind::GoBlock {
                u64::from((*gp).waitreason.load(Ordering::Relaxed))
            } else {
                0
            };
            emit((*mp).rt, (*mp).p, kind, (*gp).goid(), arg);
        }
    }
}

/// `gp` (of `sched`) is made runnable by whoever runs this (`ready`).
///
/// # Safety
///
/// `gp` is a parked G being readied by the caller.
#[inline(always)]
pub(crate) unsafe fn gounblock(sched: &Sched, gp: *mut G) {
    if on() {
        let (pp, waker) = here();
        // SAFETY: the contract: gp is ours to ready, so live.
        emit(
            sched,
            pp,
            EventKind::GoUnblock,
            unsafe { (*gp).goid() },
            waker,
        );
    }
}

/// P `pp` of `sched` stole `n` Gs from P `victim`.
#[inline(always)]
pub(crate) fn steal(sched: &Sched, pp: *mut P, victim: *mut P, n: u64) {
    if on() {
        // SAFETY: Ps live as long as their scheduler.
        let v = unsafe { (*victim).id } as u64;
        emit(sched, pp, EventKind::Steal, v, n);
    }
}

/// M `mp` took (`start`) or let go of P `pp`.
///
/// # Safety
///
/// `mp` is live; `pp` is a P of its scheduler.
#[inline(always)]
pub(crate) unsafe fn proc(mp: *mut M, pp: *mut P, start: bool) {
    if on() {
        let kind = if start {
            EventKind::ProcStart
        } else {
            EventKind::ProcStop
        };
        // SAFETY: the contract.
        unsafe { emit((*mp).rt, pp, kind, 0, (*mp).id as u64) };
    }
}

/// A timer of `sched` fired; `gp` is the G it readies, or null.
#[inline(always)]
pub(crate) fn timerfire(sched: &Sched, gp: *mut G) {
    if on() {
        let (pp, _) = here();
        // SAFETY: a G handed to its timer is live until readied.
        let g = if gp.is_null() {
            0
        } else {
            unsafe { (*gp).goid() }
        };
        emit(sched, pp, EventKind::TimerFire, g, 0);
    }
}

/// The current goroutine enters (`enter`) or leaves a blocking system
/// call: for the blocking-call work (`entersyscall` / `exitsyscall`).
#[inline(always)]
pub fn syscall(enter: bool) {
    if on() {
        let gp = getg();
        if gp.is_null() {
            return;
        }
        let (pp, g) = here();
        let kind = if enter {
            EventKind::SyscallEnter
        } else {
            EventKind::SyscallExit
        };
        // SAFETY: the current G's scheduler outlives it.
        emit(unsafe { (*gp).rt }, pp, kind, g, 0);
    }
}
