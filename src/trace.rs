//! The execution trace (Go's `trace.go`, much reduced): scheduler events
//! — goroutine create, start, stop (a yield), block (with its wait
//! reason), unblock (with the waker), end; steals; P start and stop;
//! blocking calls entered and left (a call that kept its P as an
//! instant: see "Blocking calls"); timer fires — recorded into per-P
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
//! With the feature, a hook loads no flag: a P of a scheduler that does
//! not trace has a null write position and a null limit, and the hook's
//! one compare of the two says "not tracing" (equal), "record" (below)
//! or "slow path" (above: the slow path sets the limit one byte below a
//! word boundary, so a tracing P's position never equals it). The hooks
//! use the P their caller already holds in a register (`execute`'s,
//! `newproc1`'s, `ready`'s M's), so not tracing costs the compare, a
//! stop's one store into its M (`gostop`: no P loaded, no check, no
//! call) and a start's one store clearing it, and the registers the
//! hooks' rare out-of-line calls make the compiler save; figures in
//! `docs/performance.md`, "Tracing cost".
//!
//! # Recording
//!
//! Each P has its own buffer, written only by the M that holds the P,
//! with plain stores: no lock, no locked instruction, no allocation, no
//! call. An event is mostly one 8-byte word, written inline at the call
//! site (`put`): the write position compared with the P's limit, the
//! word stored, the position bumped: with composing the word, 4–7
//! instructions an event over not tracing (a yield's stop and start 6,
//! a hand-off's wake-up, block and start 15, a blocking call that keeps
//! its P 4). Over the build without the feature a yield costs 13: the
//! stop's store; the start's compare (3), word (3: the id loaded and
//! shifted, the stash or-ed in from memory), store and bump (3), the
//! stash cleared (1); a register move around the start's out-of-line
//! slow path (1); and the slow path's share (1: a clock reading per 64
//! words). What is not the hot path is out of line (`slow`, `flush`,
//! the `cold` module).
//!
//! The record encoding (internal; [`Sched::trace_events`] turns it back
//! into [`Event`]s): a word is a code (bits 0–7), an 8-bit argument
//! (8–15) and a 48-bit one (16–63, a goroutine id modulo 2^48, a P or M
//! id). A record leaves out what the reader can work out, chiefly which
//! goroutine it is about: the reader knows which goroutine runs on each P
//! from the last start it read there.
//!
//! | code | events | words | goroutine |
//! |---|---|---|---|
//! | `SWITCH + how` | the P's goroutine stops (`how`: none, yield, end, block + wait reason), goroutine `g` starts | 1 | `g`; the stop: the P's |
//! | `STOP + how` | the P's goroutine stops, no other starts yet | 1 | the P's |
//! | `CREATE` | `g` created by the P's goroutine (0 if none) | 1 | `g` |
//! | `UNBLOCK` | `g` made runnable by the P's goroutine (0 if none) | 1 | `g` |
//! | `SYSENTER` / `SYSENTER_G` | a goroutine enters a blocking call | 1 | the P's / `g` |
//! | `SYSEXIT` | `g` is back from one that lost its P, or from a `SYSENTER_G` (and is the P's goroutine) | 1 | `g` |
//! | `TIMER` | a timer fired, readying `g` (0: a callback) | 1 | `g` |
//! | `STEAL` | the P stole (next word) goroutines from P `g` | 2 | — |
//! | `PROC_START` / `PROC_STOP` | M `g` took / let go of the P | 1 | — |
//! | `STAMP` | a clock reading: the next word is the time of the record after it | 2 | — |
//!
//! A stop costs one store: the stop site (`gosched_m`, `park_m`,
//! `goexit0`) stashes how the goroutine stopped in its M
//! (`MTrace::stash`: the M is in a register there, its P would have to
//! be loaded and checked for null), and the next start on the M writes
//! it and the new goroutine's id as one `SWITCH` record into the M's P.
//! If the P does something else first — records another event from g0
//! (a timer, a wake-up, a steal), looks beyond its own queues for work
//! (`findrunnable`, the `idle` hook), or is let go — the stash is
//! written first as a `STOP`, with its own clock reading. So a stop's
//! time is the next start's when the P found that start in its own
//! queues at once (within the few hundred nanoseconds of `schedule`'s
//! local pick), and its own otherwise. A stop on an M that holds no P
//! (a goroutine unwound by a runtime's teardown, which starts without
//! one) is written without a P, as its goroutine's (the one last started
//! on the M), when the M next starts a goroutine, takes a P or ends.
//!
//! A full chunk (2 MiB, 262,144 words) is swapped, off the hot path, for
//! a pre-faulted one from a pool (three chunks per P to start with, one
//! in use and two in the pool; hosted, a thread of the trace's own,
//! `gokernel-trace`, keeps it topped up; see `Pool`); a P keeps at most
//! [`MAX_EVENTS_PER_BUFFER`] words, and later ones are counted as dropped
//! ([`Sched::trace_dropped`]). At each clock reading the slow path asks
//! for the cache lines of the block after the next one (`prefetch`), so
//! that the records' stores find their lines in the cache: without it, a
//! store to a line not yet in the cache stalled about once every 8
//! records, and that cost more time than all the instructions. Events of
//! a thread without a P go to one shared buffer, under a lock. Memory:
//! 8 bytes an event, in 2 MiB steps, 6 MiB per P from the start.
//!
//! # Blocking calls
//!
//! As Go's tracer did before Go 1.21 (one `GoSysCall` event for a call
//! that returned with its P, `GoSysBlock` and `GoSysExit` only for one
//! that lost it), a blocking call (`gokernel::syscall::call`,
//! `blocking`) that keeps its P costs one word, at its entry, and
//! nothing on its way out: `exitsyscallfast` taking its own P back
//! records nothing. A call that loses its P (handed off at once by
//! `blocking`, retaken by sysmon, or back on another P) has its exit
//! recorded (`SYSEXIT`, with the goroutine's id) where it gets a P
//! again. The reader tells the two apart from the P's next record
//! (see `decode`): after a call that lost its P that is a P start or
//! stop, a `SYSEXIT`, or a start with no stop before it; anything else
//! means the call kept its P, and the reader adds its
//! [`EventKind::SyscallExit`] itself, at the entry's time. So such a
//! call shows as an instant (entry and exit at the same time, the exit
//! not [`exact`](Event::exact)): how long it took is not recorded, only
//! that it was made, by which goroutine, and where among the P's events
//! (its return is somewhere between the entry and the P's next event).
//! A call still in progress at the end of the trace, or the P's last
//! event, has no exit. Calls that lose their P keep both times.
//!
//! # Timestamps, and how precise the timeline is
//!
//! Reading the clock (`rdtsc`, 20–50 cycles, more under a hypervisor)
//! would cost more than the rest of an event, so not every event reads it.
//! An event carries an exact time (the TSC) when:
//!
//! - it is a P start or stop, a steal, a stop written on its own (see
//!   above), or recorded without a P;
//! - its P's events are sparse — more than about 10 µs apart on
//!   average: then every record reads the clock, which is then cheap
//!   beside the gaps;
//! - otherwise, while its P's events are dense, one record in about 64
//!   words: the first written past the end of each 64-word block (the
//!   block's end is the P's `limit`, so this costs the fast path
//!   nothing).
//!
//! The events between two readings of one P are placed evenly between
//! them, in the order they happened on that P ([`Event::exact`] tells
//! which is which; a stop written with the next start takes that start's
//! time). So in a dense stretch, the times are good to the span of 64
//! records (64 scheduler operations: a few microseconds); the one
//! case that is off by more is a long gap (a goroutine computing without
//! a scheduling point) that begins inside a dense stretch and ends before
//! the P's next clock reading: the gap is spread over the events up to
//! that reading, so the long run looks shorter and its neighbours longer,
//! by at most the gap. Order is exact within a P; across Ps the events
//! are merged by time, with causality kept: a goroutine's start never
//! comes before what created, woke or last stopped it.
//!
//! A goroutine already running when a trace starts (only
//! [`Sched::start_trace`] on a running scheduler can do that) has no
//! start in the trace, and its first stop names goroutine 0.

use alloc::collections::BTreeSet;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use crate::runtime2::{G, M, P, Sched, WaitReason};
use crate::tls::getg;
use crate::traceback::cputicks;

/// Whether this build records traces (the `trace` cargo feature).
pub const ENABLED: bool = cfg!(feature = "trace");

/// The most record words one P's buffer keeps (8 bytes each: 16 MiB per
/// P); events past it are counted as dropped. Most events take one word;
/// a clock reading takes two (about one in 64 words while events are
/// dense).
pub const MAX_EVENTS_PER_BUFFER: usize = 1 << 21;

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
    /// Goroutine `g` came back from one. For a call that kept its P this
    /// is not recorded: the reader adds it at the entry's time (see the
    /// [module docs](crate::trace), "Blocking calls").
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

/// A record's first word: the code (bits 0–7), an 8-bit argument (8–15)
/// and a goroutine id or other 48-bit argument (16–63). What each code
/// means, and which goroutine it is about when the word does not say,
/// is in [`decode`]; the module docs have the table.
mod code {
    /// A goroutine starts on the P (the id); before it, the goroutine
    /// that ran there stops, if `SWITCH + how` says how (`how`: 0 none,
    /// [`YIELD`], [`END`], [`BLOCK`] with the wait reason in bits 8–15).
    pub(super) const SWITCH: u64 = 1;
    /// The P's goroutine stops and no other starts yet (`STOP + how`,
    /// `how` ≥ 1): a stop flushed before another event of the P.
    pub(super) const STOP: u64 = SWITCH + 3;
    pub(super) const YIELD: u64 = 1;
    pub(super) const END: u64 = 2;
    pub(super) const BLOCK: u64 = 3;
    /// Goroutine (id) created by the P's goroutine (0 if none).
    pub(super) const CREATE: u64 = 8;
    /// Goroutine (id) made runnable by the P's goroutine (0 if none).
    pub(super) const UNBLOCK: u64 = 9;
    /// The P's goroutine enters a blocking call.
    pub(super) const SYSENTER: u64 = 10;
    /// Goroutine (id) enters a blocking call.
    pub(super) const SYSENTER_G: u64 = 11;
    /// Goroutine (id) is back from its call, and the P's goroutine.
    pub(super) const SYSEXIT: u64 = 12;
    /// A timer fired, readying goroutine (id, 0 for a callback).
    pub(super) const TIMER: u64 = 13;
    /// The P stole (next word) goroutines from P (id).
    pub(super) const STEAL: u64 = 14;
    /// M (id) took the P.
    pub(super) const PROC_START: u64 = 15;
    /// M (id) let the P go.
    pub(super) const PROC_STOP: u64 = 16;
    /// A clock reading: the next word is the time of the record after it.
    pub(super) const STAMP: u64 = 0xff;
}

/// The stash of an M with no stop pending: `SWITCH + 0`.
const NO_STOP: u64 = code::SWITCH;

/// A record word: `code`, the 8-bit `aux`, and `g` (modulo 2^48).
#[inline(always)]
const fn word(code: u64, aux: u64, g: u64) -> u64 {
    code | aux << 8 | g << 16
}

/// Words per clock block while a P's events are dense: the first record
/// written past a block's end reads the clock.
const BLOCK_WORDS: usize = 64;

/// Block alignment, in bytes.
const BLOCK_BYTES: usize = BLOCK_WORDS * size_of::<u64>();

/// The most words a record written by the fast path takes; the last
/// ones of a chunk stay free for it (`limit` is at least this far from
/// the end).
const FAST_WORDS: usize = 2;

/// The most words the slow path writes at once: a stashed stop, with
/// its clock reading, then a record of two words with its own.
const SLOW_WORDS: usize = 8;

/// Ticks per event above which a P's events count as sparse (about 10 µs
/// at 2–3 GHz): every event then reads the clock, which costs under 0.5 %
/// of such gaps. (High enough that the benchmark rows stay dense even
/// under valgrind, which runs them about 50 times slower: their
/// instruction counts do not depend on how slow the machine is.)
const SPARSE_TICKS: u64 = 25_000;

/// Bytes per chunk: one 2 MiB huge page (hosted, the chunk is marked
/// for one with `MADV_HUGEPAGE`: one page fault per 262,144 words rather
/// than one per 512).
const CHUNK_BYTES: usize = 2 << 20;

/// Words per chunk.
const CHUNK: usize = CHUNK_BYTES / size_of::<u64>();

// A chunk's start is where a clock block starts.
const _: () = assert!(CHUNK_BYTES.is_multiple_of(BLOCK_BYTES));

/// One buffer's memory: [`CHUNK`] words, aligned to their size.
struct Chunk(core::ptr::NonNull<u64>);

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
        let p = unsafe { alloc::alloc::alloc(Self::layout()) }.cast::<u64>();
        let Some(p) = core::ptr::NonNull::new(p) else {
            alloc::alloc::handle_alloc_error(Self::layout());
        };
        #[cfg(feature = "std")]
        // SAFETY: the chunk's own memory. Only advice: a failure (no
        // transparent huge pages) leaves 4 KiB pages.
        unsafe {
            libc::madvise(p.as_ptr().cast(), CHUNK_BYTES, libc::MADV_HUGEPAGE);
        }
        for i in (0..CHUNK).step_by(4096 / size_of::<u64>()) {
            // SAFETY: word i of the chunk.
            unsafe { core::ptr::write_volatile(p.as_ptr().add(i), 0) };
        }
        Chunk(p)
    }

    fn base(&self) -> *mut u64 {
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
/// microsecond or more in a virtual machine: more than recording the 512
/// words a 4 KiB page holds; hence huge pages, where the kernel has
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
        if want > 0 {
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

/// A P's trace state (in [`P`]): only the M holding the P writes it
/// (relaxed atomics, which are plain moves on x86_64; the release store
/// of `pos` publishes the words before it to a reader). The fields the
/// fast path reads are first, together.
pub(crate) struct PTrace {
    /// The next free word; null while the P's scheduler does not trace
    /// (set once by [`Sched::start_trace`], then by the owner only).
    pos: AtomicPtr<u64>,
    /// A record goes through the slow path when `pos > limit`: at the
    /// end of a dense clock block, at once while events are sparse, at
    /// the chunk's end; null until the owner's first slow path. The
    /// slow path sets it one byte below a word boundary, so that while
    /// tracing it never equals `pos`: `pos == limit` (both null) is "not
    /// tracing", and one compare tells the three cases apart. Only the
    /// P's owner reads or writes it (a plain field, so that the compare
    /// takes it from memory: handing the P over orders it, as it does
    /// the P's other owner-only fields).
    limit: UnsafeCell<*mut u64>,
    /// Whether the P's events are dense (a clock reading per block).
    dense: AtomicBool,
    /// The chunk's end.
    end: AtomicPtr<u64>,
    /// The last clock reading of the dense/sparse choice.
    last: AtomicU64,
}

impl PTrace {
    pub(crate) const fn new() -> Self {
        PTrace {
            pos: AtomicPtr::new(core::ptr::null_mut()),
            limit: UnsafeCell::new(core::ptr::null_mut()),
            dense: AtomicBool::new(true),
            end: AtomicPtr::new(core::ptr::null_mut()),
            last: AtomicU64::new(0),
        }
    }
}

/// An M's trace state (in [`M`]): written only by the M itself.
pub(crate) struct MTrace {
    /// The stop of the M's last goroutine not yet written: `SWITCH +
    /// how` (with the wait reason in bits 8–15), or [`NO_STOP`]. A stop
    /// site stores it (one plain store, to the M its caller has in a
    /// register: no P to load or check); the next start on the M writes
    /// it with the new goroutine's id, as one record, into the M's P;
    /// any other record of the P writes it first, and so does letting
    /// the P go. Every start clears it, tracing or not, so a stop
    /// stashed is always one not yet followed by a start.
    stash: UnsafeCell<u64>,
    /// The goroutine last started on this M without a P (teardown
    /// unwinding, see `cold::gostart_no_p`): the one a stop stashed
    /// while the M holds no P is about.
    nop_g: AtomicU64,
}

impl MTrace {
    pub(crate) const fn new() -> Self {
        MTrace {
            stash: UnsafeCell::new(NO_STOP),
            nop_g: AtomicU64::new(0),
        }
    }

    /// The stash (a plain load: folded into the instruction that uses
    /// it, where an atomic load, even relaxed, is a load of its own).
    ///
    /// # Safety
    ///
    /// On the M's own thread (the only one that reads or writes it).
    #[inline(always)]
    unsafe fn stash(&self) -> u64 {
        // SAFETY: the contract: no other thread touches it.
        unsafe { *self.stash.get() }
    }

    /// Sets the stash.
    ///
    /// # Safety
    ///
    /// As [`MTrace::stash`].
    #[inline(always)]
    unsafe fn set_stash(&self, s: u64) {
        // SAFETY: as in `stash`.
        unsafe { *self.stash.get() = s }
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
    /// Filled chunks, with how many words each holds.
    full: Vec<(Chunk, usize)>,
    /// The chunk being written (from `PTrace::pos`).
    cur: Option<Chunk>,
    /// Words in `full`.
    words: usize,
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

/// Records the one-word record `w()` in P `pp`'s buffer: the fast path,
/// a few instructions — a compare of the write position with the limit,
/// a store, the position bumped. At the limit (a clock reading due, the
/// chunk full, or the P's first record) the slow path; with the P's
/// scheduler not tracing (`pos` null), nothing: `w` is not called, so
/// that not tracing costs the compare. `mp` not null ("flushing"): the
/// calling M, which may run between a stop and the next start (on g0),
/// so a stop stashed in it is written first.
///
/// # Safety
///
/// `pp` is the P the calling M holds; `mp` is null or that M; if null,
/// no stop is stashed in the M, or `w` takes it.
#[inline(always)]
unsafe fn put(mp: *mut M, pp: *mut P, w: impl Fn() -> u64) {
    // SAFETY: the contract.
    unsafe {
        if !put_fast(mp, pp, &w) {
            if !mp.is_null() {
                return flush_then(pp, w());
            }
            slow(pp, w(), 0, 1);
        }
    }
}

/// [`put`] without its slow path: true once `w()` is recorded, or at
/// once, with `w` not called, if the P's scheduler is not tracing; false,
/// with nothing done, if the record needs the slow path (a stashed stop
/// to write first counts, when `mp` is not null). For a caller that keeps the
/// slow path out of line (`crate::syscall::entersyscall`).
///
/// # Safety
///
/// As [`put`].
#[inline(always)]
unsafe fn put_fast(mp: *mut M, pp: *mut P, w: &impl Fn() -> u64) -> bool {
    // SAFETY: the contract: our P; only we write its PTrace.
    unsafe {
        let t = &(*pp).trace;
        let pos = t.pos.load(Ordering::Relaxed);
        let limit = *t.limit.get();
        // One compare, three ways (see `PTrace::limit`).
        if pos < limit {
            if !mp.is_null() && (*mp).trace.stash() != NO_STOP {
                return false;
            }
            // limit is below the chunk's end minus FAST_WORDS.
            pos.write(w());
            t.pos.store(pos.add(1), Ordering::Release);
            return true;
        }
        // Equal: not tracing; above: the slow path.
        pos == limit
    }
}

/// Writes `pp`'s stashed stop, if any, then the record `w`.
///
/// # Safety
///
/// `pp` is the P the calling M holds.
#[cold]
#[inline(never)]
unsafe fn flush_then(pp: *mut P, w: u64) {
    // SAFETY: the contract.
    unsafe {
        flush(pp);
        slow(pp, w, 0, 1);
    }
}

/// Writes the stop stashed in the calling M into its P `pp`, with a
/// clock reading (the P is about to do something else than start a
/// goroutine: look for work, record another event, or go idle).
///
/// # Safety
///
/// `pp` is the P the calling M holds.
#[cold]
#[inline(never)]
unsafe fn flush(pp: *mut P) {
    // SAFETY: the contract: the calling M (the current G's) holds pp.
    unsafe {
        let t = &(*(*getg()).m).trace;
        // A load and a store, not a swap (a locked instruction): only
        // the M itself writes its stash.
        let s = t.stash();
        t.set_stash(NO_STOP);
        if s != NO_STOP {
            slow(pp, s - code::SWITCH + code::STOP, 0, 1);
        }
    }
}

/// Writes a record of `n` (1 or 2) words, `w0` then `w1`, with a clock
/// reading before it, and sets the limit for the records after it: the
/// end of their clock block while the P's events are dense, this very
/// position while they are sparse (so that each reads the clock), never
/// past the chunk's end. Swaps the chunk when full. Nothing if the P's
/// scheduler does not trace.
///
/// # Safety
///
/// `pp` is the P the calling M holds.
#[cold]
#[inline(never)]
unsafe fn slow(pp: *mut P, w0: u64, w1: u64, n: usize) {
    // SAFETY: the contract.
    unsafe {
        let t = &(*pp).trace;
        // Acquire: pairs with start_trace's release store (`end`).
        let mut pos = t.pos.load(Ordering::Acquire);
        if pos.is_null() {
            return;
        }
        let end = t.end.load(Ordering::Relaxed);
        if (end as usize - pos as usize) / size_of::<u64>() < SLOW_WORDS {
            pos = refill(pp);
            if pos.is_null() {
                return;
            }
        }
        let now = cputicks();
        // Dense or sparse, from the time since the last reading.
        let last = t.last.load(Ordering::Relaxed);
        t.last.store(now, Ordering::Relaxed);
        let gap = now.wrapping_sub(last);
        let dense = if t.dense.load(Ordering::Relaxed) {
            gap <= BLOCK_WORDS as u64 * SPARSE_TICKS
        } else {
            gap < SPARSE_TICKS
        };
        t.dense.store(dense, Ordering::Relaxed);
        pos.write(code::STAMP);
        pos.add(1).write(now);
        pos.add(2).write(w0);
        if n == 2 {
            pos.add(3).write(w1);
        }
        let next = pos.add(2 + n);
        t.pos.store(next, Ordering::Release);
        let end = t.end.load(Ordering::Relaxed);
        let last_ok = end.sub(FAST_WORDS);
        let bound = if dense {
            // The next block boundary after `next`.
            let boundary = ((next as usize | (BLOCK_BYTES - 1)) + 1) as *mut u64;
            if boundary < last_ok {
                boundary
            } else {
                last_ok
            }
        } else {
            next
        };
        // One byte below: a word position below `bound` is below it, one
        // at `bound` above it (never equal: see `PTrace::limit`).
        let limit = (bound as usize - 1) as *mut u64;
        *t.limit.get() = limit;
        if dense {
            // The block after the next one, into this core's cache ahead
            // of its stores (a record's store to a cold line otherwise
            // waits for the line, about once every 8 records).
            let ahead = (bound as usize).wrapping_add(BLOCK_BYTES) & !(BLOCK_BYTES - 1);
            for line in (0..BLOCK_BYTES).step_by(64) {
                prefetch(ahead.wrapping_add(line));
            }
        }
    }
}

/// Asks for the cache line at `addr` (a hint: any address is valid).
#[inline(always)]
fn prefetch(addr: usize) {
    // SAFETY: prefetch never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8);
    }
}

/// `pp`'s chunk is (nearly) full: swaps in a fresh one (or, over the
/// limit, rewrites a scratch chunk and counts what it drops). Returns the
/// new write position (null if the scheduler does not trace).
///
/// # Safety
///
/// As [`slow`].
#[cold]
#[inline(never)]
unsafe fn refill(pp: *mut P) -> *mut u64 {
    // SAFETY: the contract; pos is set, so the scheduler traces.
    unsafe {
        let Some(b) = crate::runtime2::current_sched()
            .as_ref()
            .and_then(|s| s.trace.bufs.get())
        else {
            return core::ptr::null_mut();
        };
        let t = &(*pp).trace;
        let mut l = b.per_p[(*pp).id as usize].lock();
        let Some(cur) = l.cur.take() else {
            return core::ptr::null_mut();
        };
        let base = cur.base();
        let used = t.pos.load(Ordering::Relaxed).offset_from(base) as usize;
        let base = if l.dropping {
            b.dropped.fetch_add(used as u64, Ordering::Relaxed);
            l.cur = Some(cur);
            base
        } else {
            l.full.push((cur, used));
            l.words += used;
            let c = b.pool.take();
            let base = c.base();
            l.cur = Some(c);
            l.dropping = l.words + CHUNK > MAX_EVENTS_PER_BUFFER;
            base
        };
        t.end.store(base.add(CHUNK), Ordering::Relaxed);
        t.pos.store(base, Ordering::Release);
        base
    }
}

/// Records an event without a P, in the shared buffer, with its time.
#[cold]
#[inline(never)]
fn put_no_p(sched: *const Sched, kind: EventKind, g: u64, arg: u64) {
    // SAFETY: callers pass a live scheduler or null.
    let Some(b) = (unsafe { sched.as_ref() }).and_then(|s| s.trace.bufs.get()) else {
        return;
    };
    let ticks = cputicks();
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

/// The events of one P's record words, in order, their times placed
/// (see the module docs).
///
/// The records say which goroutine they are about where the P's owner
/// could not know it for free; where they do not, it is the P's
/// goroutine: the one the last `SWITCH` (or `SYSEXIT`) started on the
/// P, until a stop, or the P changes hands.
fn decode(words: &[u64], p: u32, t0: u64) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::with_capacity(words.len() + words.len() / 4);
    // Indices of stops written with the next start: their time is its.
    let mut tied: Vec<usize> = Vec::new();
    // Exits added for calls that kept their P: their time is their
    // entry's, the event before them.
    let mut tied_prev: Vec<usize> = Vec::new();
    let mut stamp: Option<u64> = None;
    let mut cur: Option<u64> = None;
    // The goroutine of a `SYSENTER` whose call's outcome the next record
    // tells: a `SYSEXIT`, a P start or stop, or a start with no stop
    // before it (exitsyscall0 resumed the goroutine) say it lost its P,
    // and its exit is recorded; anything else, that it kept its P.
    let mut insys: Option<u64> = None;
    let stop_kind = |how: u64| match how {
        code::YIELD => EventKind::GoStop,
        code::END => EventKind::GoEnd,
        _ => EventKind::GoBlock,
    };
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        i += 1;
        let (c, aux, g) = (w & 0xff, (w >> 8) & 0xff, w >> 16);
        if c != code::STAMP
            && let Some(sg) = insys.take()
            && !matches!(
                c,
                code::SWITCH | code::SYSEXIT | code::PROC_START | code::PROC_STOP
            )
        {
            out.push(Event {
                ticks: 0,
                g: sg,
                arg: 0,
                kind: EventKind::SyscallExit,
                p: Some(p),
                exact: false,
            });
            tied_prev.push(out.len() - 1);
        }
        let ev = |kind: EventKind, g: u64, arg: u64, stamp: &mut Option<u64>| {
            let exact = stamp.take();
            Event {
                ticks: exact.unwrap_or(0),
                g,
                arg,
                kind,
                p: Some(p),
                exact: exact.is_some(),
            }
        };
        let by_cur = cur.unwrap_or(0);
        match c {
            code::STAMP => {
                stamp = words.get(i).copied();
                i += 1;
            }
            _ if (code::SWITCH..=code::SWITCH + code::BLOCK).contains(&c) => {
                let how = c - code::SWITCH;
                if how != 0 {
                    let arg = if how == code::BLOCK { aux } else { 0 };
                    out.push(ev(stop_kind(how), by_cur, arg, &mut None));
                    tied.push(out.len() - 1);
                }
                out.push(ev(EventKind::GoStart, g, 0, &mut stamp));
                cur = Some(g);
            }
            _ if (code::STOP + code::YIELD..=code::STOP + code::BLOCK).contains(&c) => {
                let how = c - code::STOP;
                let arg = if how == code::BLOCK { aux } else { 0 };
                out.push(ev(stop_kind(how), by_cur, arg, &mut stamp));
                cur = None;
            }
            code::CREATE => out.push(ev(EventKind::GoCreate, g, by_cur, &mut stamp)),
            code::UNBLOCK => out.push(ev(EventKind::GoUnblock, g, by_cur, &mut stamp)),
            code::SYSENTER => {
                out.push(ev(EventKind::SyscallEnter, by_cur, 0, &mut stamp));
                insys = Some(by_cur);
            }
            code::SYSENTER_G => out.push(ev(EventKind::SyscallEnter, g, 0, &mut stamp)),
            code::SYSEXIT => {
                out.push(ev(EventKind::SyscallExit, g, 0, &mut stamp));
                cur = Some(g);
            }
            code::TIMER => out.push(ev(EventKind::TimerFire, g, 0, &mut stamp)),
            code::STEAL => {
                let n = words.get(i).copied().unwrap_or(0);
                i += 1;
                out.push(ev(EventKind::Steal, g, n, &mut stamp));
            }
            code::PROC_START | code::PROC_STOP => {
                let kind = if c == code::PROC_START {
                    EventKind::ProcStart
                } else {
                    EventKind::ProcStop
                };
                out.push(ev(kind, 0, g, &mut stamp));
                cur = None;
            }
            // Not a record (cannot happen: the buffer is read up to the
            // published position).
            _ => {}
        }
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
    // A stop written with the next start happened at (just before) it.
    for i in tied {
        out[i].ticks = out[i + 1].ticks;
    }
    for i in tied_prev {
        out[i].ticks = out[i - 1].ticks;
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
            // Back from a call that kept its P, or on a P again.
            EventKind::SyscallExit => {
                running.insert(e.g);
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
    /// nothing). Until then, and for schedulers that never start, a hook
    /// finds its P's write position null and records nothing. Without
    /// the `trace` feature ([`ENABLED`]) nothing is recorded.
    ///
    /// A goroutine already running when the trace starts (bare metal,
    /// mid-run) has no start in it, and its first stop names goroutine 0
    /// (a stop record does not repeat the id the start carried).
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
        if !ENABLED {
            // No hook would write: nothing to set up.
            let _ = self.trace.bufs.call_once(|| Bufs {
                per_p: Vec::new(),
                pool: Pool::new(0),
                no_p: spin::Mutex::new(Vec::new()),
                dropped: AtomicU64::new(0),
                start: (cputicks(), self.platform.nanotime()),
            });
            return;
        }
        let mut started = false;
        let b = self.trace.bufs.call_once(|| {
            started = true;
            // Three chunks per P (6 MiB), faulted in now rather than while
            // recording: each P's first, and two in the pool.
            let pool = Pool::new(2 * self.procs());
            Bufs {
                per_p: (0..self.procs())
                    .map(|_| {
                        spin::Mutex::new(PChunks {
                            cur: Some(pool.take()),
                            ..PChunks::default()
                        })
                    })
                    .collect(),
                pool,
                no_p: spin::Mutex::new(Vec::new()),
                dropped: AtomicU64::new(0),
                start: (cputicks(), self.platform.nanotime()),
            }
        });
        if !started {
            return;
        }
        for (i, chunks) in b.per_p.iter().enumerate() {
            let base = chunks
                .lock()
                .cur
                .as_ref()
                .map_or(core::ptr::null_mut(), Chunk::base);
            // SAFETY: allp[i] is P i, live as long as the scheduler. Its
            // owner does not write `pos`, `end` or `limit` while `pos` is
            // null, and `limit` stays null until its owner's slow path
            // (so its fast path cannot run before then).
            unsafe {
                let t = &(*self.allp[i]).trace;
                t.end.store(base.add(CHUNK), Ordering::Relaxed);
                // Release: pairs with the slow path's acquire (`end`).
                t.pos.store(base, Ordering::Release);
            }
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
    ///
    /// How a goroutine left a P is written when that P next does
    /// something (starts a goroutine, looks for work, is let go of): a
    /// copy taken while the scheduler runs can lack the last stop, block
    /// or end on each P. Taken after [`shutdown`](Sched::shutdown) (as a
    /// dropped `Runtime` writes its trace file), it has every event.
    pub fn trace_events(&self) -> Vec<Event> {
        let Some(b) = self.trace.bufs.get() else {
            return Vec::new();
        };
        let mut streams = Vec::with_capacity(b.per_p.len() + 1);
        streams.push(b.no_p.lock().clone());
        for (i, chunks) in b.per_p.iter().enumerate() {
            let mut words: Vec<u64> = Vec::new();
            {
                let l = chunks.lock();
                for (c, used) in &l.full {
                    // SAFETY: the first `used` words were written before
                    // the chunk was filed, under this lock.
                    words
                        .extend_from_slice(unsafe { core::slice::from_raw_parts(c.base(), *used) });
                }
                if let (Some(c), false) = (&l.cur, l.dropping) {
                    let base = c.base();
                    // SAFETY: allp[i] is P i; while we hold the lock its
                    // owner cannot swap `cur`, and everything before the
                    // position it published (release) is written.
                    let pos = unsafe { (*self.allp[i]).trace.pos.load(Ordering::Acquire) };
                    let used = if pos.is_null() {
                        // start_trace has not set it yet.
                        0
                    } else {
                        // SAFETY: pos is in `cur` (at most at its end).
                        unsafe { pos.offset_from(base) }.clamp(0, CHUNK as isize)
                    };
                    // SAFETY: as above.
                    words.extend_from_slice(unsafe {
                        core::slice::from_raw_parts(base, used as usize)
                    });
                }
            }
            streams.push(decode(&words, i as u32, b.start.0));
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
// The hooks. Each is inlined into its call site: on the hot paths only
// the few instructions of `put` (or a stash store), with no flag loaded:
// a P whose scheduler does not trace has a null write position. What
// is rare is out of line, in `cold`.

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

/// The current G's M and the P it holds, if that M runs `sched` (`cur`:
/// the current G, `getg()`); the P is null otherwise.
///
/// # Safety
///
/// `cur` is `getg()`.
#[inline(always)]
unsafe fn p_of(sched: &Sched, cur: *mut G) -> (*mut M, *mut P) {
    let none = (core::ptr::null_mut(), core::ptr::null_mut());
    if cur.is_null() {
        return none;
    }
    // SAFETY: the current G's M is live, and its P is its own.
    unsafe {
        let mp = (*cur).m;
        if mp.is_null() || !core::ptr::eq((*mp).rt, sched) {
            return none;
        }
        (mp, (*mp).p)
    }
}

/// A G of `sched` was made (`newproc1`), by the current goroutine if
/// any; `pp` is the calling M's P, or null if the caller does not know
/// it (then it is looked for, out of line).
#[inline(always)]
pub(crate) fn gocreate(sched: &Sched, pp: *mut P, gp: *mut G) {
    if !ENABLED {
        return;
    }
    if pp.is_null() {
        return cold::created_by(sched, gp);
    }
    // SAFETY: pp is our M's P (its `m`, our M); gp is new and ours. By
    // the P's goroutine (m.curg), if any: on g0 between a stop and the
    // next start there is none, and the stop is written first.
    unsafe {
        let mp = (*pp).m.load(Ordering::Relaxed);
        core::hint::assert_unchecked(!mp.is_null());
        put(mp, pp, || word(code::CREATE, 0, (*gp).goid()));
    }
}

/// `gp` starts running on `mp`, which holds `pp` (`execute`): one
/// record, which also says how the goroutine before it on the P
/// stopped (the stash).
///
/// # Safety
///
/// On `mp`'s g0; `pp` is `mp.p`; `gp` is the G it runs.
#[inline(always)]
pub(crate) unsafe fn gostart(mp: *mut M, pp: *mut P, gp: *mut G) {
    if !ENABLED {
        return;
    }
    // SAFETY: the contract.
    unsafe {
        if pp.is_null() {
            return cold::gostart_no_p(mp, gp);
        }
        let t = &(*mp).trace;
        put(core::ptr::null_mut(), pp, || t.stash() | (*gp).goid() << 16);
        // Tracing or not: a stash is always a stop not yet followed by a
        // start (see `MTrace::stash`).
        t.set_stash(NO_STOP);
    }
}

/// `gp` leaves its M: `kind` is `GoStop`, `GoBlock` or `GoEnd`. Only
/// stashed in the M (one store, whether tracing or not, with or without
/// a P): the next start on the M, or whatever its P records first,
/// writes it.
///
/// # Safety
///
/// On the g0 of the M `mp` that `gp` just left, which still holds its
/// P, if any; if none, `gp` started on `mp` without one.
#[inline(always)]
pub(crate) unsafe fn gostop(mp: *mut M, gp: *mut G, kind: EventKind) {
    if !ENABLED {
        return;
    }
    // SAFETY: the contract.
    unsafe {
        debug_assert!(
            !(*mp).p.is_null()
                || (*mp).rt.is_null()
                || (*mp).trace.nop_g.load(Ordering::Relaxed) == (*gp).goid(),
            "a goroutine stopped without a P that did not start without one"
        );
        let s = match kind {
            EventKind::GoStop => code::SWITCH + code::YIELD,
            EventKind::GoEnd => code::SWITCH + code::END,
            _ => {
                // A plain read (an atomic one is loaded and then widened
                // again): gopark wrote it on this thread, and other
                // threads only read it.
                let r = (*gp).waitreason.as_ptr().read();
                (code::SWITCH + code::BLOCK) | (u64::from(r) << 8)
            }
        };
        (*mp).trace.set_stash(s);
    }
}

/// `gp` (of `sched`) is made runnable by whoever runs this (`ready`, or
/// a park whose condition already holds), on an M not known to be of
/// `sched` ([`gounblock_m`] when it is). For the scheduler only: `gp`
/// is a parked G the caller readies, and `cur` is `getg()`.
#[inline(always)]
pub(crate) fn gounblock(sched: &Sched, gp: *mut G, cur: *mut G) {
    if !ENABLED {
        return;
    }
    // SAFETY: the callers' contract: cur is getg(), gp is parked and
    // theirs to ready, so live; an M p_of returns is this thread's, of
    // `sched`.
    unsafe {
        let (mp, _) = p_of(sched, cur);
        if mp.is_null() {
            return cold::no_p_creator(sched, EventKind::GoUnblock, gp);
        }
        gounblock_m(mp, gp);
    }
}

/// [`gounblock`] by the goroutine running on `mp`, the calling thread's
/// M, of `gp`'s scheduler: `ready` knows that much, so only its P is
/// looked at.
///
/// # Safety
///
/// As [`gounblock`]; `mp` is the calling thread's M, of `gp`'s
/// scheduler.
#[inline(always)]
pub(crate) unsafe fn gounblock_m(mp: *mut M, gp: *mut G) {
    if !ENABLED {
        return;
    }
    // SAFETY: the contract: mp's P, if any, is ours.
    unsafe {
        let pp = (*mp).p;
        if pp.is_null() {
            return cold::no_p_creator(&*(*mp).rt, EventKind::GoUnblock, gp);
        }
        // By the P's goroutine, if any (as in gocreate).
        put(mp, pp, || word(code::UNBLOCK, 0, (*gp).goid()));
    }
}

/// [`gounblock_m`] on `cur`'s M if `on_m`, else [`gounblock`]: `ready`
/// says `on_m` when it has seen that the caller runs on an M of `gp`'s
/// scheduler holding a P.
///
/// # Safety
///
/// As [`gounblock`]; if `on_m`, `cur` is a G of an M of `gp`'s
/// scheduler.
#[inline(always)]
pub(crate) unsafe fn gounblock_m_or(on_m: bool, sched: &Sched, gp: *mut G, cur: *mut G) {
    if on_m {
        // SAFETY: the contract.
        unsafe { gounblock_m((*cur).m, gp) }
    } else {
        gounblock(sched, gp, cur);
    }
}

/// P `pp` of `sched` stole `n` Gs from P `victim`.
#[inline(always)]
pub(crate) fn steal(sched: &Sched, pp: *mut P, victim: *mut P, n: u64) {
    if ENABLED {
        // SAFETY: Ps live as long as their scheduler; pp is the caller's.
        unsafe { cold::exact(sched, pp, word(code::STEAL, 0, (*victim).id as u64), n, 2) };
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
    // SAFETY: the contract.
    unsafe {
        // Inline, the check that keeps a blocking call's fast exit off
        // the cold path.
        if ENABLED && !(start && (*mp).insyscall.load(Ordering::Relaxed)) {
            cold::proc(mp, pp, start);
        }
    }
}

/// M `mp`, holding `pp`, found no goroutine in its own queues and looks
/// further (`findrunnable`): a stop still stashed is written now, at
/// its time, rather than when the P next starts one. For the scheduler
/// only: `mp` is the calling M, `pp` its P.
#[inline(always)]
pub(crate) fn idle(mp: *mut M, pp: *mut P) {
    // SAFETY: the caller's contract: mp is its M, pp its P, live, and
    // only this M writes their trace state.
    if ENABLED && unsafe { (*mp).trace.stash() } != NO_STOP {
        // SAFETY: as above.
        unsafe { flush(pp) };
    }
}

/// A timer of `sched` fired; `gp` is the G it readies, or null.
#[inline(always)]
pub(crate) fn timerfire(sched: &Sched, gp: *mut G) {
    if ENABLED {
        cold::timerfire(sched, gp);
    }
}

/// The goroutine of P `pp` enters a blocking call, still holding `pp`
/// (`entersyscall`, `entersyscallblock`): one word, without the id (it
/// is the P's goroutine), and nothing on the way out if the call keeps
/// its P (see the module docs, "Blocking calls").
///
/// # Safety
///
/// `pp` is the P the calling M holds.
#[inline(always)]
pub(crate) unsafe fn syscall_enter(pp: *mut P) {
    // SAFETY: the contract.
    unsafe {
        if !syscall_enter_fast(pp) {
            syscall_enter_slow(pp);
        }
    }
}

/// [`syscall_enter`]'s fast path: false if the record needs the slow
/// path, [`syscall_enter_slow`] (which `entersyscall` calls out of line,
/// so that its own fast path saves no registers for a call).
///
/// # Safety
///
/// As [`syscall_enter`].
#[inline(always)]
pub(crate) unsafe fn syscall_enter_fast(pp: *mut P) -> bool {
    if !ENABLED {
        return true;
    }
    // SAFETY: the contract. A running goroutine's P has no stop stashed.
    unsafe { put_fast(core::ptr::null_mut(), pp, &|| code::SYSENTER) }
}

/// [`syscall_enter`]'s slow path.
///
/// # Safety
///
/// As [`syscall_enter`].
#[cold]
#[inline(never)]
pub(crate) unsafe fn syscall_enter_slow(pp: *mut P) {
    // SAFETY: the contract.
    unsafe { slow(pp, code::SYSENTER, 0, 1) };
}

/// `gp` on `mp` is back from a call that lost its P, with a P again
/// (`exitsyscall`'s slow paths): with the id, since the P may be another
/// than the one it left.
///
/// # Safety
///
/// As [`syscall_enter`].
#[inline(always)]
pub(crate) unsafe fn syscall_exit(mp: *mut M, gp: *mut G) {
    if !ENABLED {
        return;
    }
    // SAFETY: the contract.
    unsafe {
        let pp = (*mp).p;
        if pp.is_null() {
            return cold::put_no_p_g(mp, EventKind::SyscallExit, gp);
        }
        // Taken by exitsyscallfast (nothing stashed: it was idle or in
        // the call) or by exitsyscall0 and execute (which wrote it).
        put(core::ptr::null_mut(), pp, || {
            word(code::SYSEXIT, 0, (*gp).goid())
        });
    }
}

/// The current goroutine enters (`enter`) or leaves a blocking system
/// call that the runtime does not see (`gokernel::syscall::call` records
/// its own).
#[inline(always)]
pub fn syscall(enter: bool) {
    if ENABLED {
        cold::syscall(enter);
    }
}

/// M `mp`, holding no P, ends (`teardown::mexit`): a stop stashed in it
/// is written.
///
/// # Safety
///
/// `mp` is the calling thread's M, holding no P.
#[inline(always)]
pub(crate) unsafe fn mexit(mp: *mut M) {
    if ENABLED {
        // SAFETY: the contract.
        unsafe { cold::flush_no_p(mp) };
    }
}

/// The hooks' rare halves, out of line.
mod cold {
    use super::*;

    /// An event of `gp` by the current goroutine (the creator or the
    /// waker: `kind` is `GoCreate` or `GoUnblock`) recorded off a P of
    /// `sched`.
    #[cold]
    #[inline(never)]
    pub(super) fn no_p_creator(sched: &Sched, kind: EventKind, gp: *mut G) {
        if !sched.tracing() {
            return;
        }
        // The current goroutine's id, whichever scheduler it runs on.
        let (_, me) = here();
        // SAFETY: the callers' gp is live.
        let g = unsafe { (*gp).goid() };
        put_no_p(sched, kind, g, me);
    }

    /// `gp` created by whoever runs this, whose P (if any) `newproc1`
    /// was not given.
    #[cold]
    #[inline(never)]
    pub(super) fn created_by(sched: &Sched, gp: *mut G) {
        // SAFETY: getg() is the current G; gp is new and ours.
        unsafe {
            let (mp, pp) = p_of(sched, getg());
            if pp.is_null() {
                no_p_creator(sched, EventKind::GoCreate, gp);
            } else {
                put(mp, pp, || word(code::CREATE, 0, (*gp).goid()));
            }
        }
    }

    /// `gp` starts on `mp`, which holds no P.
    ///
    /// # Safety
    ///
    /// As [`super::gostart`].
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn gostart_no_p(mp: *mut M, gp: *mut G) {
        // SAFETY: the contract.
        unsafe {
            flush_no_p(mp);
            let g = (*gp).goid();
            (*mp).trace.nop_g.store(g, Ordering::Relaxed);
            put_no_p((*mp).rt, EventKind::GoStart, g, 0);
        }
    }

    /// Writes the stop stashed in `mp`, which holds no P, if any: the
    /// stop of the goroutine last started on it without one
    /// ([`gostart_no_p`]), recorded without a P, at the time of this
    /// call (the M's next start, its taking a P, or its end).
    ///
    /// # Safety
    ///
    /// `mp` is the calling thread's M, holding no P.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn flush_no_p(mp: *mut M) {
        // SAFETY: the contract.
        unsafe {
            let t = &(*mp).trace;
            let s = t.stash();
            if s == NO_STOP {
                return;
            }
            t.set_stash(NO_STOP);
            let (kind, arg) = match (s & 0xff) - code::SWITCH {
                code::YIELD => (EventKind::GoStop, 0),
                code::END => (EventKind::GoEnd, 0),
                _ => (EventKind::GoBlock, (s >> 8) & 0xff),
            };
            put_no_p((*mp).rt, kind, t.nop_g.load(Ordering::Relaxed), arg);
        }
    }

    /// An event of `gp` on `mp`, which holds no P.
    ///
    /// # Safety
    ///
    /// `mp` is the calling thread's M; `gp` is live.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn put_no_p_g(mp: *mut M, kind: EventKind, gp: *mut G) {
        // SAFETY: the contract.
        unsafe { put_no_p((*mp).rt, kind, (*gp).goid(), 0) };
    }

    /// Records a rare event of `n` words with its own clock reading.
    ///
    /// # Safety
    ///
    /// `pp` is null or the P the calling M holds, of `sched`.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn exact(sched: *const Sched, pp: *mut P, w0: u64, w1: u64, n: usize) {
        if pp.is_null() {
            let (kind, g, arg) = match w0 & 0xff {
                code::STEAL => (EventKind::Steal, w0 >> 16, w1),
                code::PROC_START => (EventKind::ProcStart, 0, w0 >> 16),
                _ => (EventKind::ProcStop, 0, w0 >> 16),
            };
            put_no_p(sched, kind, g, arg);
        } else {
            // SAFETY: the contract.
            unsafe {
                flush(pp);
                slow(pp, w0, w1, n);
            }
        }
    }

    /// See [`super::proc`].
    ///
    /// # Safety
    ///
    /// As there.
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn proc(mp: *mut M, pp: *mut P, start: bool) {
        // SAFETY: the contract.
        unsafe {
            if start {
                // A stop stashed in an M that takes a P was stashed while
                // it held none (letting a P go writes or drops the stash).
                flush_no_p(mp);
            }
            if (*pp).trace.pos.load(Ordering::Relaxed).is_null() {
                // Not tracing: a stop stashed is dropped with the P.
                (*mp).trace.set_stash(NO_STOP);
                return;
            }
            let c = if start {
                code::PROC_START
            } else {
                code::PROC_STOP
            };
            // Letting the P go: exact writes a stop stashed in mp first.
            exact((*mp).rt, pp, word(c, 0, (*mp).id as u64), 0, 1);
        }
    }

    /// See [`super::timerfire`].
    #[cold]
    #[inline(never)]
    pub(super) fn timerfire(sched: &Sched, gp: *mut G) {
        // SAFETY: a G handed to its timer is live until readied.
        let g = if gp.is_null() {
            0
        } else {
            unsafe { (*gp).goid() }
        };
        // SAFETY: getg() is the current G.
        unsafe {
            let (mp, pp) = p_of(sched, getg());
            if pp.is_null() {
                if sched.tracing() {
                    put_no_p(sched, EventKind::TimerFire, g, 0);
                }
            } else {
                put(mp, pp, || word(code::TIMER, 0, g));
            }
        }
    }

    /// See [`super::syscall`].
    #[cold]
    #[inline(never)]
    pub(super) fn syscall(enter: bool) {
        let (mp, g) = here();
        if mp.is_null() {
            return;
        }
        let (kind, c) = if enter {
            (EventKind::SyscallEnter, code::SYSENTER_G)
        } else {
            (EventKind::SyscallExit, code::SYSEXIT)
        };
        // SAFETY: mp is this thread's M; a P it holds is its own.
        unsafe {
            let pp = (*mp).p;
            if pp.is_null() {
                put_no_p((*mp).rt, kind, g, 0);
            } else {
                put(mp, pp, || word(c, 0, g));
            }
        }
    }
}
