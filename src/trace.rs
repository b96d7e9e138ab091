//! The execution trace (Go's `trace.go`, much reduced): scheduler events
//! — goroutine create, start, stop (a yield), block (with its wait
//! reason), unblock (with the waker), end; steals; P start and stop;
//! blocking calls entered and left; timer fires — recorded into per-P
//! buffers while tracing is on, and exported as Chrome trace-event JSON,
//! which Perfetto's UI (<https://ui.perfetto.dev>) and `chrome://tracing`
//! open: a lane per P, each goroutine's run a slice on it, a wake-up an
//! arrow from the waker to where the woken goroutine next runs. `cargo
//! xtask trace FILE` draws the same as an SVG picture.
//!
//! Hosted: `Builder::trace` or
//! `GOKERNEL_TRACE=FILE` writes the JSON when the runtime is dropped;
//! `Runtime::trace_json` returns it at any
//! time. Bare metal: [`Sched::start_trace`], then [`Sched::trace_events`]
//! (the events, e.g. to send over a serial line) or
//! [`Sched::trace_json`].
//!
//! # The `trace` feature, and the cost
//!
//! The hooks exist only with the crate's `trace` cargo feature
//! ([`ENABLED`]); without it they are compiled out, costing nothing, and a
//! trace asked for stays empty (the hosted runtime says so on stderr).
//! With the feature and no trace started, each hook is one load of a
//! process-wide count and a branch not taken (figures in
//! `docs/performance.md`, "Tracing cost").
//!
//! Recording: each P has its own buffer, written only by the M that holds
//! the P, with plain stores: no lock, no locked instruction, no
//! allocation. An event is one 16-byte record (kind, an 8-bit argument,
//! the goroutine id, a 64-bit argument), written behind the hook's check
//! by a call to a few instructions: a load of the P's write position, a
//! mask test, two stores and a bump (about 20–30 instructions an event in
//! all). A full buffer (a 2 MiB chunk, 131,072 records) is swapped, off
//! the hot path, for a pre-faulted one from a pool (two chunks per P to
//! start with; hosted, a thread of the trace's own, `gokernel-trace`,
//! keeps it topped up; see `Pool`); a P keeps at most
//! [`MAX_EVENTS_PER_BUFFER`] records, and later ones are counted as
//! dropped ([`Sched::trace_dropped`]). Events of a thread without a P go
//! to one shared buffer, under a lock. Memory: 16 bytes an event, in 2 MiB
//! steps, 4 MiB per P from the start.
//!
//! # Timestamps, and how precise the timeline is
//!
//! Reading the clock (`rdtsc`, 20–50 cycles, more under a hypervisor)
//! would cost more than the rest of an event, so not every event reads it.
//! An event carries an exact time (the TSC) when:
//!
//! - it is a block (`GoBlock`): the time `gopark` already reads for the
//!   goroutine's wait time;
//! - it is a P start or stop, a steal, or recorded without a P;
//! - its P's events are sparse — more than about 10 µs apart on
//!   average: then every event reads the clock, which is then cheap
//!   beside the gaps;
//! - otherwise, while its P's events are dense, one in 64: the first
//!   record of each 64-record block is a clock reading.
//!
//! The events between two readings of one P are placed evenly between
//! them, in the order they happened on that P ([`Event::exact`] tells
//! which is which). So in a dense stretch, the times are good to the span
//! of 64 events (64 scheduler operations: a few microseconds); the one
//! case that is off by more is a long gap (a goroutine computing without
//! a scheduling point) that begins inside a dense stretch and ends before
//! the P's next clock reading: the gap is spread over the events up to
//! that reading, so the long run looks shorter and its neighbours longer,
//! by at most the gap. Order is exact within a P; across Ps the events
//! are merged by time, with causality kept: a goroutine's start never
//! comes before what created, woke or last stopped it.

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::runtime2::{G, M, P, Sched, WaitReason};
use crate::tls::getg;
use crate::traceback::cputicks;

/// Schedulers tracing now, in the whole process: the hooks' one check.
static TRACING: AtomicUsize = AtomicUsize::new(0);

/// Whether this build records traces (the `trace` cargo feature).
pub const ENABLED: bool = cfg!(feature = "trace");

/// The most records one P's buffer keeps (16 bytes each: 16 MiB per P);
/// events past it are counted as dropped. Clock readings are records too
/// (one in 64 while events are dense).
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
    /// The kind with this `as u8` value.
    const fn from_u8(v: u8) -> Option<Self> {
        const ALL: [EventKind; 12] = [
            EventKind::GoCreate,
            EventKind::GoStart,
            EventKind::GoStop,
            EventKind::GoBlock,
            EventKind::GoUnblock,
            EventKind::GoEnd,
            EventKind::Steal,
            EventKind::ProcStart,
            EventKind::ProcStop,
            EventKind::TimerFire,
            EventKind::SyscallEnter,
            EventKind::SyscallExit,
        ];
        if (v as usize) < ALL.len() {
            Some(ALL[v as usize])
        } else {
            None
        }
    }

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
    /// When, in CPU ticks (see [`Sched::trace_json`] for microseconds):
    /// exact if [`exact`](Self::exact), else placed between its P's
    /// neighbouring clock readings (see the [module docs](crate::trace)).
    pub ticks: u64,
    /// The goroutine (or, for `Steal`, the victim P). Recorded modulo
    /// 2^48.
    pub g: u64,
    /// The kind's argument (see [`EventKind`]).
    pub arg: u64,
    /// What happened.
    pub kind: EventKind,
    /// The P whose buffer holds it; `None`: recorded without a P.
    pub p: Option<u32>,
    /// Whether `ticks` was read from the clock for this event.
    pub exact: bool,
}

// ---------------------------------------------------------------------
// Recording.

/// One record of a P's buffer: `head` is the kind (bits 0–7), the 8-bit
/// argument (8–15) and the goroutine id (16–63); `arg` the 64-bit
/// argument — for a `GoBlock` its time (the 8-bit one is the reason), for
/// a clock reading ([`STAMP`]) the time of the record after it.
#[derive(Clone, Copy)]
#[repr(C)]
struct Rec {
    head: u64,
    arg: u64,
}

/// The kind byte of a clock reading.
const STAMP: u8 = 0xff;

/// Records per clock reading while a P's events are dense.
const STAMP_EVERY: usize = 64;

/// The write position's bits that are zero at the start of a 64-record
/// block (blocks are aligned to their size): the dense mask.
const DENSE_MASK: usize = STAMP_EVERY * size_of::<Rec>() - 1;

/// Ticks per event above which a P's events count as sparse (about 10 µs
/// at 2–3 GHz): every event then reads the clock, which costs under 0.5 %
/// of such gaps. (High enough that the benchmark rows stay dense even
/// under valgrind, which runs them about 50 times slower: their
/// instruction counts do not depend on how slow the machine is.)
const SPARSE_TICKS: u64 = 25_000;

/// Bytes per chunk: one 2 MiB huge page (hosted, the chunk is marked
/// for one with `MADV_HUGEPAGE`: one page fault per 131,072 records
/// rather than one per 256).
const CHUNK_BYTES: usize = 2 << 20;

/// Records per chunk.
const CHUNK: usize = CHUNK_BYTES / size_of::<Rec>();

// A chunk's start is where a 64-record block starts (the dense mask).
const _: () = assert!(CHUNK_BYTES.is_multiple_of(DENSE_MASK + 1));

/// One buffer's memory: [`CHUNK`] records, aligned to their size.
struct Chunk(core::ptr::NonNull<Rec>);

// SAFETY: a chunk is plain memory, owned by whoever holds the Chunk.
unsafe impl Send for Chunk {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for Chunk {}

impl Chunk {
    fn layout() -> core::alloc::Layout {
        // 2 MiB, aligned to 2 MiB: a valid layout.
        core::alloc::Layout::from_size_align(CHUNK_BYTES, CHUNK_BYTES).unwrap()
    }

    /// A pre-faulted chunk: every page written (volatile, so that the
    /// compiler cannot leave it lazily mapped), so that recording into it
    /// takes no page fault.
    fn new() -> Chunk {
        // SAFETY: a layout of non-zero size.
        let p = unsafe { alloc::alloc::alloc(Self::layout()) }.cast::<Rec>();
        let Some(p) = core::ptr::NonNull::new(p) else {
            alloc::alloc::handle_alloc_error(Self::layout());
        };
        #[cfg(feature = "std")]
        // SAFETY: the chunk's own memory. Only advice: a failure (no
        // transparent huge pages) leaves 4 KiB pages.
        unsafe {
            libc::madvise(p.as_ptr().cast(), CHUNK_BYTES, libc::MADV_HUGEPAGE);
        }
        for i in (0..CHUNK).step_by(4096 / size_of::<Rec>()) {
            // SAFETY: record i of the chunk.
            unsafe { core::ptr::write_volatile(p.as_ptr().add(i), Rec { head: 0, arg: 0 }) };
        }
        Chunk(p)
    }

    fn base(&self) -> *mut Rec {
        self.0.as_ptr()
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: allocated in Chunk::new with this layout.
        unsafe { alloc::alloc::dealloc(self.0.as_ptr().cast(), Self::layout()) };
    }
}

/// Chunks ready to be swapped in, shared by a scheduler's Ps.
///
/// Filling a chunk's fresh pages costs the kernel a page fault each (a
/// microsecond or more in a virtual machine: more than recording the 256
/// events a 4 KiB page holds; hence huge pages, where the kernel has
/// them). Hosted, a thread of the trace's own
/// (`gokernel-trace`) keeps the pool topped up, so the threads that
/// record never take those faults; bare metal, or if it falls behind, a
/// P that finds the pool empty makes a chunk itself.
struct Pool {
    chunks: spin::Mutex<Vec<Chunk>>,
    /// How many chunks the filler keeps ready.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    want: usize,
    #[cfg(feature = "std")]
    filler: spin::Once<Option<std::thread::Thread>>,
}

impl Pool {
    fn new(want: usize) -> alloc::sync::Arc<Pool> {
        let pool = alloc::sync::Arc::new(Pool {
            chunks: spin::Mutex::new((0..want).map(|_| Chunk::new()).collect()),
            want,
            #[cfg(feature = "std")]
            filler: spin::Once::new(),
        });
        #[cfg(feature = "std")]
        {
            let weak = alloc::sync::Arc::downgrade(&pool);
            let t = std::thread::Builder::new()
                .name("gokernel-trace".into())
                .spawn(move || fill(&weak))
                .ok()
                .map(|h| h.thread().clone());
            pool.filler.call_once(|| t);
        }
        pool
    }

    fn take(&self) -> Chunk {
        let (c, left) = {
            let mut v = self.chunks.lock();
            let c = v.pop();
            (c, v.len())
        };
        #[cfg(feature = "std")]
        if left < self.want
            && let Some(Some(t)) = self.filler.get()
        {
            t.unpark();
        }
        #[cfg(not(feature = "std"))]
        let _ = left;
        c.unwrap_or_else(Chunk::new)
    }
}

/// The filler thread: tops the pool up to `want` chunks whenever woken,
/// until the trace is dropped.
#[cfg(feature = "std")]
fn fill(pool: &alloc::sync::Weak<Pool>) {
    loop {
        {
            let Some(pool) = pool.upgrade() else { return };
            while pool.chunks.lock().len() < pool.want {
                let c = Chunk::new();
                pool.chunks.lock().push(c);
            }
        }
        std::thread::park_timeout(core::time::Duration::from_millis(100));
    }
}

/// A P's write position (in [`P`]): only the M holding the P writes it
/// (relaxed atomics, which are plain moves on x86_64; the release store
/// of `pos` publishes the records before it to a reader).
pub(crate) struct PTrace {
    /// The next free record; null until the P records its first event.
    pos: AtomicPtr<Rec>,
    /// One record before the chunk's end: reaching it swaps the chunk
    /// (so that a clock reading and its event always fit).
    end: AtomicPtr<Rec>,
    /// [`DENSE_MASK`], or 0 while events are sparse: a record goes through
    /// the slow path (and reads the clock) when `pos & mask == 0`.
    mask: AtomicUsize,
    /// The last clock reading of the dense/sparse choice.
    last: AtomicU64,
}

impl PTrace {
    pub(crate) const fn new() -> Self {
        PTrace {
            pos: AtomicPtr::new(core::ptr::null_mut()),
            end: AtomicPtr::new(core::ptr::null_mut()),
            mask: AtomicUsize::new(0),
            last: AtomicU64::new(0),
        }
    }
}

/// A scheduler's trace buffers: one per P, and one for events recorded
/// without a P.
#[derive(Default)]
pub struct SchedTrace {
    bufs: spin::Once<Bufs>,
}

/// One P's chunks, under its lock: taken by the P's owner only to swap a
/// chunk, and by readers.
#[derive(Default)]
struct PChunks {
    /// Filled chunks, with how many records each holds.
    full: Vec<(Chunk, usize)>,
    /// The chunk being written (from `PTrace::pos`).
    cur: Option<Chunk>,
    /// Records in `full`.
    records: usize,
    /// Over [`MAX_EVENTS_PER_BUFFER`]: `cur` is scratch, rewritten.
    dropping: bool,
}

struct Bufs {
    per_p: Vec<spin::Mutex<PChunks>>,
    pool: alloc::sync::Arc<Pool>,
    no_p: spin::Mutex<Vec<Event>>,
    dropped: AtomicU64,
    /// The ticks/nanoseconds pair the trace starts at.
    start: (u64, u64),
}

impl Drop for SchedTrace {
    fn drop(&mut self) {
        if self.bufs.get().is_some() {
            TRACING.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[inline(always)]
const fn head(kind: EventKind, aux: u8, g: u64) -> u64 {
    kind as u64 | (aux as u64) << 8 | g << 16
}

/// Records an event in P `pp`'s buffer: the hot path.
///
/// # Safety
///
/// `pp` is the P the calling M holds.
#[inline(always)]
unsafe fn put(pp: *mut P, kind: EventKind, aux: u8, g: u64, arg: u64) {
    // SAFETY: the contract: our P; only we write its PTrace.
    unsafe {
        let t = &(*pp).trace;
        let pos = t.pos.load(Ordering::Relaxed);
        // Null (the first event) or a clock reading due: the slow path.
        if (pos as usize) & t.mask.load(Ordering::Relaxed) == 0 {
            return put_slow(pp, head(kind, aux, g), arg);
        }
        write(pp, pos, head(kind, aux, g), arg);
    }
}

/// Writes a record at `pos` and moves past it.
///
/// # Safety
///
/// `pp` is the caller's P; `pos` is a free record of its chunk, before
/// `end`'s successor.
#[inline(always)]
unsafe fn write(pp: *mut P, pos: *mut Rec, head: u64, arg: u64) {
    // SAFETY: the contract.
    unsafe {
        let t = &(*pp).trace;
        pos.write(Rec { head, arg });
        let next = pos.add(1);
        t.pos.store(next, Ordering::Release);
        if next >= t.end.load(Ordering::Relaxed) {
            refill(pp);
        }
    }
}

/// The scheduler the calling M runs (null off any M).
fn cur_sched() -> *const Sched {
    let gp = getg();
    if gp.is_null() {
        return core::ptr::null();
    }
    // SAFETY: the current G's M, if any, is live.
    unsafe {
        let mp = (*gp).m;
        if mp.is_null() {
            core::ptr::null()
        } else {
            (*mp).rt
        }
    }
}

/// The record with a clock reading before it: the first record of a P
/// (which sets its buffer up), one in 64 while dense, every one while
/// sparse, and the rare kinds that are always exact.
///
/// # Safety
///
/// `pp` is the P the calling M holds.
#[cold]
#[inline(never)]
unsafe fn put_slow(pp: *mut P, head: u64, arg: u64) {
    // SAFETY: the contract.
    unsafe {
        let t = &(*pp).trace;
        let mut pos = t.pos.load(Ordering::Relaxed);
        if pos.is_null() {
            pos = install(pp);
            if pos.is_null() {
                return;
            }
        }
        let now = cputicks();
        // Dense or sparse, from the time since the last reading.
        let last = t.last.load(Ordering::Relaxed);
        t.last.store(now, Ordering::Relaxed);
        let gap = now.wrapping_sub(last);
        if t.mask.load(Ordering::Relaxed) == 0 {
            if gap < SPARSE_TICKS {
                t.mask.store(DENSE_MASK, Ordering::Relaxed);
            }
        } else if gap > STAMP_EVERY as u64 * SPARSE_TICKS {
            t.mask.store(0, Ordering::Relaxed);
        }
        pos.write(Rec {
            head: u64::from(STAMP),
            arg: now,
        });
        // pos was before `end`: its successor is in the chunk.
        write(pp, pos.add(1), head, arg);
    }
}

/// Sets up the buffer of `pp` (the calling M's P) if its scheduler
/// traces; returns the write position, or null.
///
/// # Safety
///
/// As [`put_slow`].
unsafe fn install(pp: *mut P) -> *mut Rec {
    let sched = cur_sched();
    // SAFETY: the calling M's scheduler is live; pp is one of its Ps.
    unsafe {
        let Some(b) = sched.as_ref().and_then(|s| s.trace.bufs.get()) else {
            return core::ptr::null_mut();
        };
        let mut l = b.per_p[(*pp).id as usize].lock();
        let c = b.take_chunk();
        let base = c.base();
        l.cur = Some(c);
        let t = &(*pp).trace;
        t.end.store(base.add(CHUNK - 1), Ordering::Relaxed);
        t.mask.store(DENSE_MASK, Ordering::Relaxed);
        t.pos.store(base, Ordering::Release);
        base
    }
}

/// `pp`'s chunk is full: swaps in a fresh one (or, over the limit,
/// rewrites a scratch chunk and counts what it drops).
///
/// # Safety
///
/// As [`put_slow`].
#[cold]
#[inline(never)]
unsafe fn refill(pp: *mut P) {
    // SAFETY: the contract; install ran for pp, so its scheduler traces.
    unsafe {
        let Some(b) = cur_sched().as_ref().and_then(|s| s.trace.bufs.get()) else {
            return;
        };
        let t = &(*pp).trace;
        let mut l = b.per_p[(*pp).id as usize].lock();
        let Some(cur) = l.cur.take() else { return };
        let base = cur.base();
        let used = t.pos.load(Ordering::Relaxed).offset_from(base) as usize;
        let base = if l.dropping {
            b.dropped.fetch_add(used as u64, Ordering::Relaxed);
            l.cur = Some(cur);
            base
        } else {
            l.full.push((cur, used));
            l.records += used;
            let c = b.take_chunk();
            let base = c.base();
            l.cur = Some(c);
            l.dropping = l.records + CHUNK > MAX_EVENTS_PER_BUFFER;
            base
        };
        t.end.store(base.add(CHUNK - 1), Ordering::Relaxed);
        t.pos.store(base, Ordering::Release);
    }
}

impl Bufs {
    fn take_chunk(&self) -> Chunk {
        self.pool.take()
    }
}

/// Records an event without a P, in the shared buffer (`ticks`: its
/// time, if already read).
#[cold]
#[inline(never)]
fn put_no_p(sched: *const Sched, kind: EventKind, g: u64, arg: u64, ticks: Option<u64>) {
    // SAFETY: callers pass a live scheduler or null.
    let Some(b) = (unsafe { sched.as_ref() }).and_then(|s| s.trace.bufs.get()) else {
        return;
    };
    let ticks = ticks.unwrap_or_else(cputicks);
    let mut v = b.no_p.lock();
    if v.len() >= MAX_EVENTS_PER_BUFFER {
        b.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    v.push(Event {
        ticks,
        g,
        arg,
        kind,
        p: None,
        exact: true,
    });
}

// ---------------------------------------------------------------------
// Reading back.

/// The events of one P's records, in order, their times placed (see the
/// module docs).
fn decode(recs: &[Rec], p: u32, t0: u64) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::with_capacity(recs.len());
    let mut stamp: Option<u64> = None;
    for r in recs {
        let kind = (r.head & 0xff) as u8;
        if kind == STAMP {
            stamp = Some(r.arg);
            continue;
        }
        let Some(kind) = EventKind::from_u8(kind) else {
            continue;
        };
        let aux = (r.head >> 8) & 0xff;
        let g = r.head >> 16;
        let (arg, exact) = if kind == EventKind::GoBlock {
            (aux, Some(r.arg))
        } else {
            (r.arg, stamp)
        };
        stamp = None;
        out.push(Event {
            ticks: exact.unwrap_or(0),
            g,
            arg,
            kind,
            p: Some(p),
            exact: exact.is_some(),
        });
    }
    // Place the others evenly between the exact ones around them.
    let mut next: Vec<Option<usize>> = alloc::vec![None; out.len()];
    let mut after = None;
    for i in (0..out.len()).rev() {
        next[i] = after;
        if out[i].exact {
            after = Some(i);
        }
    }
    let mut prev: Option<usize> = None;
    let mut floor = t0;
    for i in 0..out.len() {
        if !out[i].exact {
            out[i].ticks = match (prev, next[i]) {
                (Some(a), Some(z)) => {
                    let (ta, tz) = (out[a].ticks, out[z].ticks.max(out[a].ticks));
                    let span = u128::from(tz - ta);
                    ta + (span * (i - a) as u128 / (z - a) as u128) as u64
                }
                (Some(a), None) => out[a].ticks,
                (None, Some(z)) => out[z].ticks,
                (None, None) => floor,
            };
        } else {
            prev = Some(i);
        }
        // Monotonic within the P, whatever the TSCs of its threads say.
        out[i].ticks = out[i].ticks.max(floor);
        floor = out[i].ticks;
    }
    out
}

/// Merges per-buffer event lists by time, keeping causality: a
/// goroutine's `GoStart` waits until what created it, woke it or stopped
/// its last run has been taken (times are approximate, so a start on one
/// P can look earlier than the wake-up on another). Times are made
/// non-decreasing.
fn merge(streams: Vec<Vec<Event>>) -> Vec<Event> {
    let total = streams.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total);
    let mut pending_create: BTreeSet<u64> = streams
        .iter()
        .flatten()
        .filter(|e| e.kind == EventKind::GoCreate)
        .map(|e| e.g)
        .collect();
    let mut blocked = BTreeSet::new();
    let mut running = BTreeSet::new();
    let mut at = alloc::vec![0usize; streams.len()];
    let mut now = 0u64;
    while out.len() < total {
        let mut best: Option<usize> = None;
        let mut any: Option<usize> = None;
        for (s, ev) in streams.iter().enumerate() {
            let Some(e) = ev.get(at[s]) else { continue };
            let earlier = |o: Option<usize>| o.is_none_or(|o| e.ticks < streams[o][at[o]].ticks);
            if earlier(any) {
                any = Some(s);
            }
            let ready = e.kind != EventKind::GoStart
                || !(pending_create.contains(&e.g)
                    || blocked.contains(&e.g)
                    || running.contains(&e.g));
            if ready && earlier(best) {
                best = Some(s);
            }
        }
        // None ready: events were dropped; take the earliest.
        let Some(s) = best.or(any) else { break };
        let mut e = streams[s][at[s]];
        at[s] += 1;
        match e.kind {
            EventKind::GoCreate => {
                pending_create.remove(&e.g);
            }
            EventKind::GoStart => {
                running.insert(e.g);
            }
            // A goroutine back from a blocking call without its P starts
            // again (exitsyscall0) with no stop in between.
            EventKind::GoStop | EventKind::GoEnd | EventKind::SyscallEnter => {
                running.remove(&e.g);
            }
            EventKind::GoBlock => {
                running.remove(&e.g);
                blocked.insert(e.g);
            }
            EventKind::GoUnblock => {
                blocked.remove(&e.g);
            }
            _ => {}
        }
        now = now.max(e.ticks);
        e.ticks = now;
        out.push(e);
    }
    out
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
            // Two chunks per P (4 MiB), faulted in now rather than while
            // recording.
            let pool = Pool::new(2 * self.procs());
            Bufs {
                per_p: (0..self.procs())
                    .map(|_| spin::Mutex::new(PChunks::default()))
                    .collect(),
                pool,
                no_p: spin::Mutex::new(Vec::new()),
                dropped: AtomicU64::new(0),
                start: (cputicks(), self.platform.nanotime()),
            }
        });
        if started {
            TRACING.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether this scheduler records a trace.
    pub fn tracing(&self) -> bool {
        self.trace.bufs.get().is_some()
    }

    /// A copy of the events recorded so far: each P's in the order they
    /// happened on it, the buffers merged by time, keeping each
    /// goroutine's start after what made it runnable (see the [module
    /// docs](crate::trace) for the times' precision). Empty if the trace
    /// was never started.
    pub fn trace_events(&self) -> Vec<Event> {
        let Some(b) = self.trace.bufs.get() else {
            return Vec::new();
        };
        let mut streams = Vec::with_capacity(b.per_p.len() + 1);
        streams.push(b.no_p.lock().clone());
        for (i, chunks) in b.per_p.iter().enumerate() {
            let mut recs: Vec<Rec> = Vec::new();
            {
                let l = chunks.lock();
                for (c, used) in &l.full {
                    // SAFETY: the first `used` records were written before
                    // the chunk was filed, under this lock.
                    recs.extend_from_slice(unsafe { core::slice::from_raw_parts(c.base(), *used) });
                }
                if let (Some(c), false) = (&l.cur, l.dropping) {
                    let base = c.base();
                    // SAFETY: allp[i] is P i; while we hold the lock its
                    // owner cannot swap `cur`, and everything before the
                    // position it published (release) is written.
                    let pos = unsafe { (*self.allp[i]).trace.pos.load(Ordering::Acquire) };
                    // SAFETY: pos is in `cur` (at most one past its end).
                    let used = unsafe { pos.offset_from(base) }.clamp(0, CHUNK as isize);
                    // SAFETY: as above.
                    recs.extend_from_slice(unsafe {
                        core::slice::from_raw_parts(base, used as usize)
                    });
                }
            }
            streams.push(decode(&recs, i as u32, b.start.0));
        }
        let mut no_p = core::mem::take(&mut streams[0]);
        no_p.sort_by_key(|e| e.ticks);
        streams[0] = no_p;
        merge(streams)
    }

    /// Events not recorded because a buffer was full (approximate: the
    /// records of the scratch chunks written past the limit).
    pub fn trace_dropped(&self) -> u64 {
        self.trace
            .bufs
            .get()
            .map_or(0, |b| b.dropped.load(Ordering::Relaxed))
    }

    /// The trace as Chrome trace-event JSON (see the [module
    /// docs](crate::trace)); `None` if it was never started.
    pub fn trace_json(&self) -> Option<String> {
        let b = self.trace.bufs.get()?;
        let events = self.trace_events();
        let (t0, n0) = b.start;
        // Ticks to microseconds, at the rate measured over the trace so far.
        let (t1, n1) = (cputicks(), self.platform.nanotime());
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
// The hooks. Each is inlined: a check of `TRACING`, then (tracing) the
// few stores of `put`; the rest is out of line.

/// Whether any scheduler traces (never, without the `trace` feature: the
/// hooks are compiled out).
#[inline(always)]
fn on() -> bool {
    ENABLED && TRACING.load(Ordering::Relaxed) != 0
}

/// Records an event of M `mp`: in its P's buffer, or the shared one.
///
/// # Safety
///
/// `mp` is the calling thread's M.
#[inline(always)]
unsafe fn put_m(mp: *mut M, kind: EventKind, aux: u8, g: u64, arg: u64) {
    // SAFETY: the contract: our M, our P.
    unsafe {
        let pp = (*mp).p;
        if pp.is_null() {
            let ticks = (kind == EventKind::GoBlock).then_some(arg);
            let arg = if kind == EventKind::GoBlock {
                u64::from(aux)
            } else {
                arg
            };
            put_no_p((*mp).rt, kind, g, arg, ticks);
        } else {
            put(pp, kind, aux, g, arg);
        }
    }
}

/// The current M and the goid of the goroutine it runs (0 on g0); null
/// off any M.
#[inline(always)]
fn here() -> (*mut M, u64) {
    let gp = getg();
    if gp.is_null() {
        return (core::ptr::null_mut(), 0);
    }
    // SAFETY: the current G's M is live; only this thread writes its
    // curg.
    unsafe {
        let mp = (*gp).m;
        if mp.is_null() {
            return (mp, 0);
        }
        let cur = (*mp).curg;
        let id = if cur.is_null() { 0 } else { (*cur).goid() };
        (mp, id)
    }
}

/// Records an event of whoever runs this, for `sched` (which, off any M,
/// gets it in its shared buffer).
#[inline(always)]
fn put_here(sched: &Sched, kind: EventKind, g: u64, arg_is_me: bool, arg: u64) {
    let (mp, me) = here();
    let arg = if arg_is_me { me } else { arg };
    // SAFETY: mp is this thread's M; a P it holds is its scheduler's.
    unsafe {
        if !mp.is_null() && core::ptr::eq((*mp).rt, sched) {
            put_m(mp, kind, 0, g, arg);
        } else {
            put_no_p(sched, kind, g, arg, None);
        }
    }
}

/// A G of `sched` was made (`newproc1`).
#[inline(always)]
pub(crate) fn gocreate(sched: &Sched, gp: *mut G) {
    if on() {
        // SAFETY: gp is new and ours.
        unsafe { rec::gocreate(sched, gp) };
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
        unsafe { rec::gostart(mp, gp) };
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
        unsafe { rec::gostop(mp, gp, kind) };
    }
}

/// `gp` (of `sched`) is made runnable by whoever runs this (`ready`, or
/// a park whose condition already holds).
///
/// # Safety
///
/// `gp` is a parked G being readied by the caller.
#[inline(always)]
pub(crate) unsafe fn gounblock(sched: &Sched, gp: *mut G) {
    if on() {
        // SAFETY: the contract.
        unsafe { rec::gounblock(sched, gp) };
    }
}

/// P `pp` of `sched` stole `n` Gs from P `victim`.
#[inline(always)]
pub(crate) fn steal(sched: &Sched, pp: *mut P, victim: *mut P, n: u64) {
    if on() {
        // SAFETY: Ps live as long as their scheduler; pp is the caller's.
        unsafe {
            let v = (*victim).id as u64;
            exact(sched, pp, EventKind::Steal, v, n);
        }
    }
}

/// Records a rare event with its own clock reading.
///
/// # Safety
///
/// `pp` is null or the P the calling M holds, of `sched`.
#[cold]
#[inline(never)]
unsafe fn exact(sched: *const Sched, pp: *mut P, kind: EventKind, g: u64, arg: u64) {
    if pp.is_null() {
        put_no_p(sched, kind, g, arg, None);
    } else {
        // SAFETY: the contract.
        unsafe { put_slow(pp, head(kind, 0, g), arg) };
    }
}

/// M `mp` took (`start`) or let go of P `pp`. Not recorded: taking a P
/// back on the way out of a blocking call (`SyscallExit` says it).
///
/// # Safety
///
/// `mp` is the calling thread's M; `pp` is a P of its scheduler, which
/// `mp` holds (`start`: from now; else: until after this).
#[inline(always)]
pub(crate) unsafe fn proc(mp: *mut M, pp: *mut P, start: bool) {
    if on() {
        // SAFETY: the contract.
        unsafe {
            if start && (*mp).insyscall.load(Ordering::Relaxed) {
                return;
            }
            let kind = if start {
                EventKind::ProcStart
            } else {
                EventKind::ProcStop
            };
            exact((*mp).rt, pp, kind, 0, (*mp).id as u64);
        }
    }
}

/// A timer of `sched` fired; `gp` is the G it readies, or null.
#[inline(always)]
pub(crate) fn timerfire(sched: &Sched, gp: *mut G) {
    if on() {
        // SAFETY: a G handed to its timer is live until readied.
        let g = if gp.is_null() {
            0
        } else {
            unsafe { (*gp).goid() }
        };
        put_here(sched, EventKind::TimerFire, g, false, 0);
    }
}

/// `gp` on `mp` enters a blocking call (`entersyscall`), still holding
/// its P.
///
/// # Safety
///
/// `mp` is the calling thread's M, `gp` its current G.
#[inline(always)]
pub(crate) unsafe fn syscall_enter(mp: *mut M, gp: *mut G) {
    if on() {
        // SAFETY: the contract.
        unsafe { rec::syscall(mp, gp, EventKind::SyscallEnter) };
    }
}

/// `gp` on `mp` is back from its call, with a P again (`exitsyscall`).
///
/// # Safety
///
/// As [`syscall_enter`].
#[inline(always)]
pub(crate) unsafe fn syscall_exit(mp: *mut M, gp: *mut G) {
    if on() {
        // SAFETY: the contract.
        unsafe { rec::syscall(mp, gp, EventKind::SyscallExit) };
    }
}

/// The current goroutine enters (`enter`) or leaves a blocking system
/// call that the runtime does not see (`gokernel::syscall::call` records
/// its own).
#[inline(always)]
pub fn syscall(enter: bool) {
    if on() {
        let (mp, g) = here();
        if mp.is_null() {
            return;
        }
        let kind = if enter {
            EventKind::SyscallEnter
        } else {
            EventKind::SyscallExit
        };
        // SAFETY: mp is this thread's M.
        unsafe { put_m(mp, kind, 0, g, 0) };
    }
}

/// The hooks' recording halves, out of line: a hook inlined into the
/// scheduler is only its check of `TRACING`, so that with tracing off the
/// scheduler's code (and what the compiler inlines into it) stays as it
/// is without the hooks. Each is the few stores of [`put`] behind a call.
mod rec {
    use super::*;

    /// See [`super::gocreate`].
    ///
    /// # Safety
    ///
    /// `gp` is a live G.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn gocreate(sched: &Sched, gp: *mut G) {
        // SAFETY: the contract.
        let g = unsafe { (*gp).goid() };
        put_here(sched, EventKind::GoCreate, g, true, 0);
    }

    /// See [`super::gostart`].
    ///
    /// # Safety
    ///
    /// As there.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn gostart(mp: *mut M, gp: *mut G) {
        // SAFETY: the contract.
        unsafe { put_m(mp, EventKind::GoStart, 0, (*gp).goid(), 0) };
    }

    /// See [`super::gostop`].
    ///
    /// # Safety
    ///
    /// As there.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn gostop(mp: *mut M, gp: *mut G, kind: EventKind) {
        // SAFETY: the contract.
        unsafe {
            // A block's time is the one gopark read for its wait time.
            let (aux, arg) = if kind == EventKind::GoBlock {
                (
                    (*gp).waitreason.load(Ordering::Relaxed),
                    (*gp).waitsince.load(Ordering::Relaxed),
                )
            } else {
                (0, 0)
            };
            put_m(mp, kind, aux, (*gp).goid(), arg);
        }
    }

    /// See [`super::gounblock`].
    ///
    /// # Safety
    ///
    /// As there.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn gounblock(sched: &Sched, gp: *mut G) {
        // SAFETY: the contract: gp is ours to ready, so live.
        let g = unsafe { (*gp).goid() };
        put_here(sched, EventKind::GoUnblock, g, true, 0);
    }

    /// See [`super::syscall_enter`].
    ///
    /// # Safety
    ///
    /// As there.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn syscall(mp: *mut M, gp: *mut G, kind: EventKind) {
        // SAFETY: the contract.
        unsafe { put_m(mp, kind, 0, (*gp).goid(), 0) };
    }
}
