//! The hosted API (the `std` feature): [`Runtime`] (built with
//! [`Builder`]; [`Runtime::block_on`] runs a main goroutine,
//! [`Runtime::scope`] one that borrows), [`go`], [`spawn`] and
//! [`JoinHandle`], [`gosched`], [`current`], [`park`] /
//! [`Goroutine::unpark`], [`lock_os_thread`] / [`unlock_os_thread`],
//! [`num_goroutine`], [`stats`] and [`dump`], and the schedtrace monitor
//! (`GOKERNEL_SCHEDTRACE`, [`Builder::schedtrace`]). Everything here is
//! also at the crate root (`gokernel::go`, …).
//!
//! ```
//! use gokernel::Runtime;
//!
//! let rt = Runtime::builder().procs(2).build().unwrap();
//! let sum = rt.block_on(|| {
//!     let hs: Vec<_> = (0..10u64).map(|i| gokernel::spawn(move || i * i)).collect();
//!     hs.into_iter().map(|h| h.join().unwrap()).sum::<u64>()
//! });
//! assert_eq!(sum, Ok(285));
//! ```

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::platform::hosted::HOSTED;
use crate::proc::{PStats, Parker, Stats, newproc};
use crate::runtime2::Sched;
use crate::stack::{STACK_DEFAULT, StackError, check_stack_size};
use crate::tls::getg;
use crate::traceback::{Dump, GoroutineInfo};

/// The most Ps a runtime may have.
pub const MAX_PROCS: usize = 1024;

/// `block_on`'s error: every goroutine is parked and none can run. It
/// carries a [`Dump`] of the runtime's goroutines taken when the deadlock
/// was found, and prints like Go's report: the line
/// `all goroutines are asleep - deadlock!`, a blank line, then each
/// goroutine (`goroutine 7 [chan receive, 12 ms]:`, its stack if
/// tracebacks are on — [`Builder::traceback`] or `GOKERNEL_TRACEBACK=all`
/// — and `created by FILE:LINE:COL`).
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let err = rt
///     .block_on(|| {
///         let c = gokernel::chan::<u32>(0);
///         c.recv() // nobody else has it: every goroutine is asleep
///     })
///     .unwrap_err();
/// let main = &err.goroutines()[0];
/// assert_eq!(main.wait_reason, Some(gokernel::runtime2::WaitReason::ChanReceive));
/// assert!(err.to_string().starts_with("all goroutines are asleep - deadlock!\n\ngoroutine "));
/// assert!(err.to_string().contains(" [chan receive, "));
/// ```
#[derive(Clone, Debug)]
pub struct Deadlock {
    dump: Dump,
}

impl Deadlock {
    /// The runtime's goroutines when the deadlock was found, by id.
    pub fn goroutines(&self) -> &[GoroutineInfo] {
        self.dump.goroutines()
    }

    /// The same as a [`Dump`].
    pub fn dump(&self) -> &Dump {
        &self.dump
    }
}

/// Two reports are equal when they name the same goroutines in the same
/// states, created at the same places; how long each had waited, and
/// their tracebacks, are not compared. (So `Result<T, Deadlock>` values
/// compare, as in `assert_eq!(rt.block_on(|| 1), Ok(1))`.)
impl PartialEq for Deadlock {
    fn eq(&self, other: &Deadlock) -> bool {
        let key = |g: &GoroutineInfo| (g.id, g.status, g.wait_reason, g.created_by);
        self.goroutines().len() == other.goroutines().len()
            && self
                .goroutines()
                .iter()
                .zip(other.goroutines())
                .all(|(a, b)| key(a) == key(b))
    }
}

impl Eq for Deadlock {}

impl core::fmt::Display for Deadlock {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("all goroutines are asleep - deadlock!")?;
        if !self.dump.goroutines().is_empty() {
            write!(f, "\n\n{}", self.dump)?;
        }
        Ok(())
    }
}

impl std::error::Error for Deadlock {}

/// Removes a deadlock hook when dropped (`block_on`, `Runtime::scope`).
pub(crate) struct HookGuard<'a> {
    pub(crate) sched: &'a Sched,
    pub(crate) key: u64,
}

impl Drop for HookGuard<'_> {
    fn drop(&mut self) {
        self.sched.remove_deadlock_hook(self.key);
    }
}

/// The report of a deadlock just found on `sched`.
pub(crate) fn deadlock_report(sched: &Sched) -> Deadlock {
    Deadlock { dump: sched.dump() }
}

/// Why a runtime could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// `procs` was 0 or above [`MAX_PROCS`].
    Procs {
        /// The value given.
        procs: usize,
    },
    /// The stack size is out of bounds.
    StackSize(StackError),
}

impl core::fmt::Display for BuildError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BuildError::Procs { procs } => {
                write!(f, "procs must be between 1 and {MAX_PROCS}, not {procs}")
            }
            BuildError::StackSize(e) => write!(f, "bad stack size: {e}"),
        }
    }
}

impl std::error::Error for BuildError {}

/// Configures a [`Runtime`].
///
/// Two settings trade a guarantee for something else and are `unsafe`:
/// [`migrate_started_goroutines`](Builder::migrate_started_goroutines)
/// (goroutines may move between threads once started; by default they
/// never do) and [`unguarded_stacks`](Builder::unguarded_stacks) (stacks
/// without a hardware guard page; by default every stack has one).
///
/// Every goroutine stack a runtime allocates has a hardware guard: a page
/// below it that faults on access, so an overflow faults at once and is
/// reported naming the goroutine. On Linux 6.13 and later the guard is a
/// guard marker and stacks come many to a kernel mapping; on older kernels
/// each costs two of the process's kernel mappings, so about 28,669
/// goroutines (live, or dead and kept for reuse) fit under Linux's default
/// `vm.max_map_count` of 65,530, and beyond that spawning fails with
/// [`StackError::GuardedStacksExhausted`], which says how to raise the
/// limit (see [`stack`](crate::stack)). A program that needs more
/// goroutines than it can raise the limit for can give up the guards with
/// the `unsafe` [`unguarded_stacks`](Self::unguarded_stacks).
#[derive(Clone, Debug)]
pub struct Builder {
    procs: Option<usize>,
    stack_size: usize,
    report_go_panics: bool,
    schedtrace: Option<Duration>,
    migrate: bool,
    unguarded_stacks: bool,
    traceback: bool,
    trace: Option<std::path::PathBuf>,
    /// `None`: from the environment; `Some(None)`: off.
    stall_limit: Option<Option<Duration>>,
}

impl Builder {
    /// Go's full migration of goroutines between threads: a goroutine
    /// that has started may resume on any thread after it yields or parks,
    /// yields go to the global queue, and idle threads steal started
    /// goroutines too.
    ///
    /// Without it (the default) a goroutine that has started runs only on
    /// the OS thread it first ran on; goroutines that have not started yet
    /// go to whichever thread is free (their closures are `Send`), which
    /// is what balances the load. What migration gains: a goroutine woken
    /// or yielding while its own thread is busy with another goroutine can
    /// run at once on an idle one. What it gives up is below.
    ///
    /// # Safety
    ///
    /// The program promises that no goroutine of this runtime depends on
    /// staying on one thread between two scheduling points (a yield, a
    /// park, `sleep`, a channel or `sync` operation that waits, `join`):
    ///
    /// - it uses no `thread_local!` (its own or any library's, std's
    ///   included: `thread::current`, `RandomState` keys and the panic
    ///   count are thread-local) in a function that also reaches a
    ///   scheduling point — LLVM computes a thread-local's address once per
    ///   function and keeps it across calls, so the access after the switch
    ///   may use the old thread's copy (a double free in glibc has been seen
    ///   from a `Cell<Option<Box<_>>>`);
    /// - it holds no thread-keyed lock or handle across one (`StdoutLock`,
    ///   a reentrant mutex, anything `!Send` tied to the thread);
    /// - no panic unwinds across one (std counts panics per thread; a
    ///   destructor that parks during unwinding would finish the unwind on
    ///   another thread).
    ///
    /// Breaking the promise is undefined behaviour, not a panic.
    ///
    /// ```
    /// // SAFETY: these goroutines touch no thread-local state.
    /// let rt = unsafe { gokernel::Runtime::builder().procs(2).migrate_started_goroutines() }
    ///     .build()
    ///     .unwrap();
    /// rt.block_on(|| gokernel::gosched()).unwrap();
    /// ```
    pub unsafe fn migrate_started_goroutines(mut self) -> Self {
        self.migrate = true;
        self
    }

    /// The number of Ps: Gs that run in parallel (Go's GOMAXPROCS). The
    /// default is the number of CPUs.
    pub fn procs(mut self, n: usize) -> Self {
        self.procs = Some(n);
        self
    }

    /// The stack size of every G, between
    /// [`STACK_MIN`](crate::stack::STACK_MIN) and
    /// [`STACK_MAX`](crate::stack::STACK_MAX), rounded up to a whole page
    /// of [`PAGE_SIZE`](crate::stack::PAGE_SIZE) bytes (40,000 becomes
    /// 40,960) before the bounds are checked. The default is
    /// [`STACK_DEFAULT`] (256 KiB of address space; only touched pages cost
    /// memory).
    pub fn stack_size(mut self, bytes: usize) -> Self {
        let page = crate::stack::PAGE_SIZE;
        // Saturating: a size too large to round is refused by `build` as
        // above STACK_MAX.
        self.stack_size = bytes.saturating_add(page - 1) & !(page - 1);
        self
    }

    /// What a panic in a goroutine started with [`go`] does: by default, as
    /// in Go, it ends the process with the panic message and the
    /// goroutine's id. With `true` it is reported on stderr (message and
    /// goroutine id) and only that goroutine ends. Goroutines started with
    /// `spawn` always hand their panic to `join` instead.
    pub fn report_go_panics(mut self, report: bool) -> Self {
        self.report_go_panics = report;
        self
    }

    /// Prints a line of scheduler state (see
    /// [`schedtrace`](crate::proc::schedtrace)) on stderr every `period`,
    /// from a monitor thread that stops when the runtime is dropped: Go's
    /// `GODEBUG=schedtrace=<ms>`. [`Duration::ZERO`] turns it off. Periods
    /// under a millisecond count as one.
    ///
    /// Without this option the environment decides:
    /// `GOKERNEL_SCHEDTRACE=<ms>` (a whole number of milliseconds; 0 or
    /// empty is off). A value that is not one is reported once on stderr
    /// (`gokernel: ignoring GOKERNEL_SCHEDTRACE="…": …`) and no trace runs.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let rt = gokernel::Runtime::builder()
    ///     .procs(1)
    ///     .schedtrace(Duration::from_millis(100)) // "SCHED 100ms: gomaxprocs=1 …"
    ///     .build()
    ///     .unwrap();
    /// drop(rt); // the monitor stops here
    /// ```
    pub fn schedtrace(mut self, period: Duration) -> Self {
        self.schedtrace = Some(period);
        self
    }

    /// Gives this runtime's goroutines stacks without a hardware guard:
    /// slots of arenas of 256 stacks, each with a *soft* guard (a page
    /// below the stack that must stay zero, checked whenever the goroutine
    /// switches out). They cost 1/256 of a kernel mapping each instead of
    /// two, so a million goroutines fit under the default
    /// `vm.max_map_count`, and they are not counted against
    /// [`stack::guard_page_budget`](crate::stack::guard_page_budget).
    ///
    /// # Safety
    ///
    /// The program promises that no goroutine of this runtime overflows its
    /// stack ([`stack_size`](Self::stack_size) bytes). Nothing catches an
    /// overflow as it happens: it is detected only at the goroutine's next
    /// switch (or if it happens to fault), and until then the goroutine
    /// writes through its soft guard into whatever lies below — another
    /// goroutine's stack, an M's stack — silently corrupting it. Unbounded
    /// recursion on such a stack is undefined behaviour.
    pub unsafe fn unguarded_stacks(mut self) -> Self {
        self.unguarded_stacks = true;
        self
    }

    /// Records the stack of every goroutine where it parks, so that
    /// [`Deadlock`] reports, [`dump`] and SIGQUIT print each parked
    /// goroutine's stack under its header, as Go's tracebacks do (Go's
    /// `GOTRACEBACK=all`). The same as `GOKERNEL_TRACEBACK=all` in the
    /// environment; both are on for the whole process while any runtime
    /// that asked lives. A debugging setting: each park then unwinds its
    /// stack (tens of microseconds) and takes a global lock (see
    /// [`traceback`](crate::traceback)).
    ///
    /// ```
    /// let rt = gokernel::Runtime::builder().procs(1).traceback(true).build().unwrap();
    /// let err = rt.block_on(gokernel::park).unwrap_err();
    /// let frames = err.goroutines()[0].traceback.as_ref().unwrap();
    /// assert!(frames[0].contains("gopark"), "{frames:?}");
    /// ```
    pub fn traceback(mut self, on: bool) -> Self {
        self.traceback = on;
        self
    }

    /// Records an execution trace (see [`trace`](crate::trace)) and writes
    /// it to `path` as Chrome trace-event JSON when the runtime is dropped
    /// (open it in <https://ui.perfetto.dev> or `chrome://tracing`, or draw
    /// it with `cargo xtask trace FILE`). Without this option the
    /// environment decides: `GOKERNEL_TRACE=FILE` traces every runtime of
    /// the process, the first into `FILE`, later ones into `FILE.2`,
    /// `FILE.3`, …. A file that cannot be written is reported on stderr.
    /// Needs the crate's `trace` feature (`gokernel::trace::ENABLED`):
    /// without it the hooks are compiled out, the trace has no events, and
    /// `build` says so on stderr.
    ///
    /// ```
    /// let path = std::env::temp_dir().join(format!("gokernel-doc-trace-{}.json", std::process::id()));
    /// let rt = gokernel::Runtime::builder().procs(1).trace(&path).build().unwrap();
    /// rt.block_on(|| gokernel::spawn(|| 1).join().unwrap()).unwrap();
    /// if gokernel::trace::ENABLED {
    ///     assert!(rt.trace_json().unwrap().contains("\"GoCreate\""));
    /// }
    /// drop(rt);
    /// let json = std::fs::read_to_string(&path).unwrap();
    /// assert!(json.starts_with("{\"displayTimeUnit\""));
    /// # std::fs::remove_file(&path).unwrap();
    /// ```
    pub fn trace(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.trace = Some(path.into());
        self
    }

    /// The stall detector's limit (see [`sysmon`](crate::sysmon)): a
    /// goroutine that runs this long without a scheduling point (a yield,
    /// a park, a blocking call) is reported once on stderr — its id, where
    /// it was started, for how long, and a backtrace of where it is — and
    /// goes on untouched. `None` turns it off. The default is
    /// [`STALL_DEFAULT`](crate::sysmon::STALL_DEFAULT) (1 s).
    ///
    /// Without this option the environment decides: `GOKERNEL_STALL=<ms>`
    /// (a whole number of milliseconds), or `off` (also `0`). A value that
    /// is neither is reported once on stderr and the default is used.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let rt = gokernel::Runtime::builder()
    ///     .procs(1)
    ///     .stall_limit(Some(Duration::from_millis(200)))
    ///     .build()
    ///     .unwrap();
    /// rt.block_on(|| ()).unwrap();
    /// ```
    pub fn stall_limit(mut self, limit: Option<Duration>) -> Self {
        self.stall_limit = Some(limit);
        self
    }

    /// Builds the runtime. No thread starts until there is a G to run
    /// (except the schedtrace monitor, when one is asked for); sysmon's
    /// thread starts with the first goroutine.
    ///
    /// # Errors
    ///
    /// [`BuildError::Procs`] for 0 or more than [`MAX_PROCS`] Ps,
    /// [`BuildError::StackSize`] for a stack size out of bounds.
    pub fn build(self) -> Result<Runtime, BuildError> {
        let procs = self
            .procs
            .unwrap_or_else(|| crate::platform::Platform::ncpu(&HOSTED));
        if procs == 0 || procs > MAX_PROCS {
            return Err(BuildError::Procs { procs });
        }
        check_stack_size(self.stack_size).map_err(BuildError::StackSize)?;
        let sched = if self.migrate {
            // SAFETY: the caller of migrate_started_goroutines made the
            // promise with_migration asks for.
            unsafe { Sched::with_migration(procs, self.stack_size, &HOSTED, self.report_go_panics) }
        } else {
            Sched::with_options(procs, self.stack_size, &HOSTED, self.report_go_panics)
        };
        if self.unguarded_stacks {
            // SAFETY: the caller of Builder::unguarded_stacks made the same
            // promise for this runtime's goroutines.
            unsafe { sched.use_unguarded_stacks() };
        }
        crate::traceback::hosted::traceback_from_env();
        let period = self.schedtrace.or_else(schedtrace_from_env);
        let monitor = period
            .filter(|p| !p.is_zero())
            .map(|p| Monitor::start(sched.clone(), p.max(Duration::from_millis(1))));
        let stall = self.stall_limit.unwrap_or_else(stall_from_env);
        crate::sysmon::set_stall_limit(&sched, stall);
        crate::signal_unix::register_for_sigquit(&sched);
        let trace_file = self.trace.or_else(trace_from_env);
        if trace_file.is_some() {
            if !crate::trace::ENABLED {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    std::eprintln!(
                        "gokernel: an execution trace was asked for (Builder::trace or {TRACE_ENV}), \
                         but gokernel was built without its `trace` feature: the trace will have no events"
                    );
                });
            }
            sched.start_trace();
        }
        if self.traceback {
            crate::traceback::hosted::TRACEBACK.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Runtime {
            sched,
            monitor,
            traceback: self.traceback,
            trace_file,
            sysmon: std::sync::OnceLock::new(),
        })
    }
}

/// A goroutine scheduler: `procs` Ps and the Ms (OS threads) that run Gs
/// on them. Dropping it stops the Ms: each finishes the G it is running,
/// then exits; Gs that are still runnable or parked are not run again.
pub struct Runtime {
    sched: Arc<Sched>,
    /// The schedtrace monitor thread, if one was asked for.
    monitor: Option<Monitor>,
    /// Built with `Builder::traceback(true)` (it holds tracebacks on).
    traceback: bool,
    /// Where the execution trace goes when the runtime is dropped.
    trace_file: Option<std::path::PathBuf>,
    /// The sysmon thread, started with the first goroutine.
    sysmon: std::sync::OnceLock<crate::sysmon::SysmonThread>,
}

impl Runtime {
    /// The scheduler (for the crate's other hosted modules).
    pub(crate) fn sched(&self) -> &Sched {
        &self.sched
    }

    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder {
            procs: None,
            stack_size: STACK_DEFAULT,
            report_go_panics: false,
            schedtrace: None,
            migrate: false,
            unguarded_stacks: false,
            traceback: false,
            trace: None,
            stall_limit: None,
        }
    }

    /// Starts sysmon's thread if it has not started yet (one load when it
    /// has).
    fn sysmon(&self) {
        self.sysmon
            .get_or_init(|| crate::sysmon::SysmonThread::start(self.sched.clone()));
    }

    /// Runs `f` as the main goroutine and returns its value, blocking the
    /// calling thread until it finishes. A panic in `f` is resumed here.
    ///
    /// `f` must be `'static`; for a main goroutine that borrows from the
    /// caller, use [`scope`](Self::scope).
    ///
    /// If every goroutine ends up parked with nothing runnable before `f`
    /// finishes, and none of them can be woken from outside the runtime,
    /// it returns [`Deadlock`] instead of hanging. The parked goroutines
    /// stay parked. Waits that count as wakeable from outside (so no
    /// deadlock is reported while one lasts): a pending timer, a `join` of
    /// another runtime's goroutine, and a wait on a channel, `Mutex`,
    /// `WaitGroup` or `Once` that another runtime or a plain thread has
    /// used (or, for a channel, that was made on a plain thread). A
    /// goroutine woken only by `Goroutine::unpark` from a plain thread is
    /// not seen: use [`spawn`](Self::spawn) and `join` for that, which
    /// never give up. See `docs/failures.md` (Deadlock).
    ///
    /// # Panics
    ///
    /// If called from a goroutine (it would block its M). (The main G gets
    /// its stack as [`spawn`](Self::spawn)'s do.)
    ///
    /// # Errors
    ///
    /// [`Deadlock`] when every goroutine is parked and nothing can wake one
    /// (see above).
    #[track_caller]
    pub fn block_on<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Deadlock> {
        assert!(
            getg().is_null(),
            "gokernel: Runtime::block_on called from a goroutine; use spawn and join instead"
        );
        let deadlocked = Arc::new(AtomicBool::new(false));
        let me = JoinSignal::current();
        let d = deadlocked.clone();
        // Counted as starting a goroutine until the main G is queued, so
        // that the hook hears of no deadlock decided before (about
        // goroutines parked earlier): crate::spawning.
        let spawning = crate::spawning::Spawning::begin(&self.sched);
        // Registered before the main G exists, so no deadlock is missed;
        // removed also if `spawn` panics.
        let hook = HookGuard {
            sched: &self.sched,
            key: self.sched.add_deadlock_hook(Box::new(move || {
                d.store(true, Ordering::SeqCst);
                me.notify();
            })),
        };
        let h = self.spawn(f);
        drop(spawning);
        let r = h.wait(|| deadlocked.load(Ordering::SeqCst));
        drop(hook);
        match r {
            Some(Ok(v)) => Ok(v),
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => Err(deadlock_report(&self.sched)),
        }
    }

    /// Starts a goroutine from outside the runtime (or inside it). Its
    /// stack, as for [`crate::go`]: if it gets one only when it first runs
    /// and none can be allocated then, that is a fatal error naming it;
    /// [`try_spawn`](Self::try_spawn) allocates at once instead.
    #[track_caller]
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        self.sysmon();
        spawn_on(Some(&self.sched), f)
    }

    /// [`crate::spawn_locked`] from outside the runtime
    /// (or inside it).
    ///
    /// # Panics
    ///
    /// If its stack cannot be allocated.
    #[track_caller]
    pub fn spawn_locked<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        self.sysmon();
        match try_spawn_on(Some(&self.sched), true, false, f) {
            Ok(h) => h,
            Err(e) => panic!("gokernel: {e}"),
        }
    }

    /// [`spawn`](Self::spawn), with the goroutine's stack allocated now
    /// (never at its first run): returns an error when it cannot be.
    ///
    /// # Errors
    ///
    /// [`SpawnError`] if the goroutine's stack cannot be allocated.
    #[track_caller]
    pub fn try_spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<T>, SpawnError> {
        self.sysmon();
        try_spawn_on(Some(&self.sched), false, false, f)
    }

    /// The number of Ps.
    pub fn procs(&self) -> usize {
        self.sched.procs()
    }

    /// Goroutines that exist and have not finished.
    pub fn num_goroutine(&self) -> usize {
        self.sched.ngoroutines()
    }

    /// Frees the dead goroutines kept for reuse on the runtime's global
    /// free list, with their stacks, and returns how many (Go's
    /// `debug.FreeOSMemory`, for goroutines). Dead Gs are otherwise kept
    /// for the next spawns and given back lazily, only by threads that go
    /// idle, a batch at a time; this gives their memory back now, for a
    /// program that knows a burst is over, or that measures its memory.
    /// The few a P keeps at hand (under 64 each) stay.
    ///
    /// # Example
    ///
    /// ```
    /// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
    /// rt.block_on(|| {
    ///     // 2,000 alive at once, then all finished.
    ///     let hs: Vec<_> = (0..2000).map(|i| gokernel::spawn(move || i)).collect();
    ///     hs.into_iter().for_each(|h| drop(h.join().unwrap()));
    /// })
    /// .unwrap();
    /// let kept = rt.num_allocated_gs();
    /// let freed = rt.free_dead_goroutines();
    /// assert!(freed > 1000);
    /// assert_eq!(rt.num_allocated_gs(), kept - freed);
    /// ```
    pub fn free_dead_goroutines(&self) -> usize {
        crate::proc::gffree(&self.sched)
    }

    /// Gs ever allocated; with reuse this stays near the peak number alive.
    pub fn num_allocated_gs(&self) -> usize {
        self.sched.nallgs()
    }

    /// Per-P counters: spawned, stolen, parked, scheduled, run-queue
    /// high-water mark.
    pub fn p_stats(&self) -> Vec<PStats> {
        self.sched.pstats()
    }

    /// A snapshot of the scheduler: goroutines by status, run queues, Ms
    /// and Ps, and the per-P counters (see [`Stats`]).
    ///
    /// ```
    /// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
    /// rt.block_on(|| {
    ///     let hs: Vec<_> = (0..10).map(|_| gokernel::spawn(gokernel::gosched)).collect();
    ///     hs.into_iter().for_each(|h| h.join().unwrap());
    /// })
    /// .unwrap();
    /// let s = rt.stats();
    /// assert_eq!(s.procs, 2);
    /// assert!(s.ps.iter().map(|p| p.spawned).sum::<u64>() >= 10);
    /// ```
    pub fn stats(&self) -> Stats {
        self.sched.stats()
    }

    /// Every goroutine of this runtime, as Go prints them on SIGQUIT (see
    /// [`Dump`]): from any thread, without stopping anything.
    ///
    /// ```
    /// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
    /// let h = rt.spawn(|| gokernel::sleep(std::time::Duration::from_secs(3600)));
    /// while rt.stats().goroutines.waiting == 0 {
    ///     std::thread::yield_now();
    /// }
    /// let text = rt.dump().to_string();
    /// assert!(text.starts_with(&format!("goroutine {} [sleep, ", h.id())), "{text}");
    /// ```
    pub fn dump(&self) -> Dump {
        self.sched.dump()
    }

    /// The execution trace so far, as Chrome trace-event JSON (see
    /// [`trace`](crate::trace)), if this runtime records one
    /// ([`Builder::trace`] or `GOKERNEL_TRACE`).
    pub fn trace_json(&self) -> Option<alloc::string::String> {
        self.sched.trace_json()
    }
}

impl Drop for Runtime {
    /// Stops the runtime: each thread finishes the goroutine it is running
    /// (up to its next yield, park or exit: one that never gets there holds
    /// the drop up for good, unless it polls
    /// [`shutting_down`](crate::shutting_down)), then every goroutine that
    /// started and has not finished is unwound on its own thread — its
    /// pending park returns by unwinding — so its destructors run once and
    /// the locks it holds are released (one resumed at a yield runs on to
    /// its next park: a loop that only yields holds the drop up too);
    /// goroutines that never started are dropped unrun. Their
    /// [`JoinHandle`]s then report [`RuntimeDropped`](crate::RuntimeDropped).
    /// A destructor that parks during that unwinding is a fatal error. See
    /// [`teardown`](crate::teardown) for the details and the one case
    /// that leaks instead.
    ///
    /// Dropped from one of its own goroutines (or on one of its threads'
    /// own stacks: a [`systemstack`](crate::systemstack) closure, an
    /// [`after_func`](crate::time::after_func) callback), it cannot wait
    /// for that thread: the shutdown goes on in a thread of its own and
    /// this returns at once; the calling goroutine is unwound at its next
    /// park, like the others.
    fn drop(&mut self) {
        // The monitors first: they would only report the shutdown.
        drop(self.monitor.take());
        drop(self.sysmon.take());
        if core::mem::take(&mut self.traceback) {
            crate::traceback::hosted::TRACEBACK.fetch_sub(1, Ordering::Relaxed);
        }
        // On one of its own Ms: a goroutine, or the M's own stack (a
        // `systemstack` closure, an `after_func` callback), whose thread
        // the shutdown would wait for.
        let own = core::ptr::eq(crate::runtime2::current_sched(), &*self.sched);
        let trace_file = self.trace_file.take();
        if own {
            let sched = self.sched.clone();
            thread::Builder::new()
                .name("gokernel-shutdown".into())
                .spawn(move || {
                    sched.shutdown();
                    write_trace(&sched, trace_file.as_deref());
                })
                .expect("gokernel: cannot start the shutdown thread of a runtime dropped from its own goroutine");
            return;
        }
        self.sched.shutdown();
        write_trace(&self.sched, trace_file.as_deref());
    }
}

/// Writes `sched`'s execution trace to `path`, if both are there; a
/// failure is reported on stderr.
fn write_trace(sched: &Sched, path: Option<&std::path::Path>) {
    let (Some(path), Some(json)) = (path, sched.trace_json()) else {
        return;
    };
    if let Err(e) = std::fs::write(path, json) {
        std::eprintln!(
            "gokernel: cannot write the execution trace to {}: {e}",
            path.display()
        );
    }
}

/// The environment variable that turns the execution trace on.
const TRACE_ENV: &str = "GOKERNEL_TRACE";

/// The trace file `GOKERNEL_TRACE` names for the next runtime built: the
/// value for the first, `value.N` for the N-th after it.
fn trace_from_env() -> Option<std::path::PathBuf> {
    let v = std::env::var_os(TRACE_ENV).filter(|v| !v.is_empty())?;
    static BUILT: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);
    let n = BUILT.fetch_add(1, Ordering::Relaxed);
    let mut p = std::path::PathBuf::from(v);
    if n != 0 {
        let mut name = p.clone().into_os_string();
        name.push(alloc::format!(".{}", n + 1));
        p = name.into();
    }
    Some(p)
}

/// The environment variable that sets the stall limit.
const STALL_ENV: &str = "GOKERNEL_STALL";

/// The stall limit the environment asks for: the default when unset or
/// bad (a bad value is reported once per process), `None` for `off`/`0`.
fn stall_from_env() -> Option<Duration> {
    let default = Some(crate::sysmon::STALL_DEFAULT);
    let Some(v) = std::env::var_os(STALL_ENV) else {
        return default;
    };
    match parse_stall(v.to_str()) {
        Ok(l) => l,
        Err(why) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                std::eprintln!(
                    "gokernel: ignoring {STALL_ENV}={:?}: {why}",
                    v.to_string_lossy()
                );
            });
            default
        }
    }
}

/// A `GOKERNEL_STALL` value (`None`: not valid Unicode) as a limit.
fn parse_stall(v: Option<&str>) -> Result<Option<Duration>, &'static str> {
    const WANT: &str = "expected a whole number of milliseconds, or off";
    let v = v.ok_or(WANT)?.trim();
    if v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let ms: u64 = v.parse().map_err(|_| WANT)?;
    Ok((ms != 0).then(|| Duration::from_millis(ms)))
}

/// The environment variable that turns on the schedtrace monitor.
const SCHEDTRACE_ENV: &str = "GOKERNEL_SCHEDTRACE";

/// The schedtrace period the environment asks for: `None` when it is unset,
/// empty or `0`; a bad value is reported once per process and ignored.
fn schedtrace_from_env() -> Option<Duration> {
    let v = std::env::var_os(SCHEDTRACE_ENV)?;
    match parse_schedtrace(v.to_str()) {
        Ok(p) => p,
        Err(why) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                std::eprintln!(
                    "gokernel: ignoring {SCHEDTRACE_ENV}={:?}: {why}",
                    v.to_string_lossy()
                );
            });
            None
        }
    }
}

/// A `GOKERNEL_SCHEDTRACE` value (`None`: not valid Unicode) as a period.
fn parse_schedtrace(v: Option<&str>) -> Result<Option<Duration>, &'static str> {
    let v = v.ok_or("expected a whole number of milliseconds, not valid Unicode")?;
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let ms: u64 = v.parse().map_err(
        |_| "expected a whole number of milliseconds (e.g. 1000; 0 turns the trace off)",
    )?;
    Ok((ms != 0).then(|| Duration::from_millis(ms)))
}

/// The schedtrace monitor (the part of Go's `sysmon` that calls
/// `schedtrace`): a thread that prints one line every period until told to
/// stop.
struct Monitor {
    /// Set (under the mutex) to stop the thread; the condition variable
    /// wakes it.
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Monitor {
    fn start(sched: Arc<Sched>, period: Duration) -> Monitor {
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let s = stop.clone();
        let thread = thread::Builder::new()
            .name("gokernel-schedtrace".into())
            .spawn(move || {
                let start = Instant::now();
                // None: a period beyond what the clock can reach (as
                // `Duration::MAX`) never ticks.
                let mut next = start.checked_add(period);
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    // Checked before every wait, under the lock: a drop
                    // that ran before this thread first took the lock has
                    // already set it and notified nobody.
                    if *stopped {
                        return;
                    }
                    let now = Instant::now();
                    match next {
                        None => {
                            stopped = cv.wait(stopped).unwrap_or_else(|e| e.into_inner());
                            continue;
                        }
                        Some(n) if now < n => {
                            stopped = cv
                                .wait_timeout(stopped, n - now)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                        Some(_) => {}
                    }
                    if *stopped {
                        return;
                    }
                    if next.is_none_or(|n| Instant::now() < n) {
                        continue; // a spurious wake-up
                    }
                    let ms = start.elapsed().as_millis() as u64;
                    let line = crate::proc::schedtrace(&sched.stats(), ms);
                    // One write per line; a closed stderr is not our
                    // business (eprintln would panic).
                    let _ = std::io::Write::write_all(
                        &mut std::io::stderr().lock(),
                        std::format!("{line}\n").as_bytes(),
                    );
                    // Skip ticks missed while the machine was busy.
                    let now = Instant::now();
                    while let Some(n) = next.filter(|&n| n <= now) {
                        next = n.checked_add(period);
                    }
                }
            })
            .expect("gokernel: cannot start the schedtrace monitor thread");
        Monitor {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The result slot a [`JoinHandle`] waits on.
pub(crate) struct JoinInner<T> {
    /// The address of the scheduler the goroutine runs on (compared, never
    /// followed).
    rt: usize,
    done: AtomicBool,
    result: spin::Mutex<Option<thread::Result<T>>>,
    waiter: spin::Mutex<Option<Waiter>>,
}

impl<T> JoinInner<T> {
    /// An empty slot for a goroutine of the scheduler at address `rt`.
    pub(crate) fn new(rt: usize) -> Self {
        JoinInner {
            rt,
            done: AtomicBool::new(false),
            result: spin::Mutex::new(None),
            waiter: spin::Mutex::new(None),
        }
    }
}

/// Who waits for a goroutine to finish. Neither kind touches the
/// waiter's own park token (`park` / `unpark`, `std::thread::park`), as
/// std's `join` leaves a thread's alone: a goroutine parks on a parker of
/// its own made for the wait, a thread on its [`JoinSignal`].
#[derive(Clone)]
enum Waiter {
    G(Arc<Parker>),
    Thread(Arc<JoinSignal>),
}

impl Waiter {
    fn current() -> Waiter {
        // A wait on g0 would sleep the M: a named fatal error.
        crate::sema::forbid_blocking_on_system_stack();
        if in_goroutine() {
            // SAFETY: on a user G of a scheduler (checked); only this G
            // parks on the new parker (in `wait`).
            Waiter::G(unsafe { Parker::new_for_current() })
        } else {
            Waiter::Thread(JoinSignal::current())
        }
    }

    fn wait(&self) {
        match self {
            // SAFETY: a G waiter is made by and waited on by the same G.
            Waiter::G(p) => unsafe { p.park_for(crate::runtime2::WaitReason::Join) },
            Waiter::Thread(s) => s.wait(),
        }
    }

    fn wake(self) {
        match self {
            Waiter::G(p) => p.unpark(),
            Waiter::Thread(s) => s.notify(),
        }
    }
}

/// A plain thread's wake-up for joins (and `block_on`'s deadlock hook): a
/// token like the thread's park token, but apart from it. One per thread;
/// a stale token only costs a waiter one more look at what it waits for.
pub(crate) struct JoinSignal {
    token: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl JoinSignal {
    /// The calling thread's signal.
    pub(crate) fn current() -> Arc<JoinSignal> {
        std::thread_local! {
            static SIGNAL: Arc<JoinSignal> = Arc::new(JoinSignal {
                token: std::sync::Mutex::new(false),
                cv: std::sync::Condvar::new(),
            });
        }
        SIGNAL.with(Arc::clone)
    }

    /// Blocks until the token is available, then consumes it.
    pub(crate) fn wait(&self) {
        let mut t = self.token.lock().unwrap_or_else(|e| e.into_inner());
        while !*t {
            t = self.cv.wait(t).unwrap_or_else(|e| e.into_inner());
        }
        *t = false;
    }

    /// Makes the token available, waking the thread if it waits.
    pub(crate) fn notify(&self) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_one();
    }
}

/// An owned permission to wait for a goroutine's result.
///
/// Dropping it detaches the goroutine (it runs on). `join` works from a
/// goroutine (it parks) and from a plain thread (it blocks), and across
/// runtimes.
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
/// let h = rt.spawn(|| "made outside");
/// assert!(h.id() > 0);
/// assert_eq!(h.join().unwrap(), "made outside"); // from this plain thread
/// ```
pub struct JoinHandle<T> {
    inner: Arc<JoinInner<T>>,
    id: u64,
}

impl<T> JoinHandle<T> {
    /// A handle for the goroutine `id` that reports into `inner`.
    pub(crate) fn from_parts(inner: Arc<JoinInner<T>>, id: u64) -> Self {
        JoinHandle { inner, id }
    }

    /// The goroutine's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True once the goroutine has finished.
    pub fn is_finished(&self) -> bool {
        self.inner.done.load(Ordering::Acquire)
    }

    /// Waits for the goroutine to finish and returns its result, or the
    /// panic payload if it panicked. From a goroutine this parks it; from a
    /// plain thread it blocks the thread.
    ///
    /// # Errors
    ///
    /// The goroutine's panic payload if it panicked;
    /// [`RuntimeDropped`](crate::RuntimeDropped) (as the payload) if its runtime
    /// was dropped before it finished. The one exception: a goroutine that
    /// the drop left unfinished instead of unwinding it (one on a thread
    /// where some goroutine was parked in the middle of a panic, or any
    /// started one in a build with `panic = "abort"`; see
    /// [`teardown`](crate::teardown), step 5) never finishes, and a join of
    /// it waits for good.
    ///
    /// # Panics
    ///
    /// Never: a join without a result is the runtime's bug, reported as one.
    pub fn join(self) -> thread::Result<T> {
        self.wait(|| false).expect("join gave up without a result")
    }

    /// Waits until the goroutine finishes (its result) or `give_up()` is
    /// true after a wake-up (`None`). Whoever makes `give_up` true must
    /// wake the waiter (unpark its thread or goroutine).
    fn wait(&self, give_up: impl Fn() -> bool) -> Option<thread::Result<T>> {
        let me = Waiter::current();
        // A goroutine waiting on another runtime's goroutine tells its own
        // runtime, so that all-idle there is not taken for a deadlock.
        let _external = ExternalWait::begin(self.inner.rt);
        let mut registered = false;
        loop {
            // `give_up` before `done`: a deadlock may be reported after the
            // goroutine finished (goroutines parked earlier are left), and
            // then `done` is seen. The report is decided under the
            // scheduler lock after the goroutine's P went idle, which its
            // M did after `finish` stored `done`; the flag `give_up` reads
            // is stored after that, so reading it (acquire) orders the load
            // of `done` below after `finish`'s store.
            let gave_up = give_up();
            // Acquire: pairs with the release in `finish`.
            if self.inner.done.load(Ordering::Acquire) {
                let r = self.inner.result.lock().take();
                return Some(r.expect("a joined goroutine's result was taken twice"));
            }
            if gave_up {
                return None;
            }
            if !registered {
                let mut slot = self.inner.waiter.lock();
                // Re-checked under the lock `finish` takes after setting
                // `done`: either it sees us registered, or we see `done`.
                if self.inner.done.load(Ordering::Acquire) {
                    continue;
                }
                *slot = Some(me.clone());
                registered = true;
            }
            // Tokens make a wake-up that comes before this wait count.
            me.wait();
        }
    }
}

/// The scheduler a spawn goes to: the one given, or the current
/// goroutine's.
fn target_sched(sched: Option<&Sched>) -> usize {
    match sched {
        Some(s) => s as *const Sched as usize,
        // SAFETY: only called from spawns that checked they run on a G of a
        // runtime (require_goroutine), whose M is live.
        None => unsafe { (*(*getg()).m).rt as usize },
    }
}

/// Counts, for its lifetime, a goroutine of one runtime waiting on another
/// (see `Sched::external_waits`).
struct ExternalWait(Option<Arc<Sched>>);

impl ExternalWait {
    fn begin(target: usize) -> ExternalWait {
        if !in_goroutine() {
            return ExternalWait(None);
        }
        // SAFETY: on a goroutine: its M's scheduler is live.
        let mine = unsafe { &*(*(*getg()).m).rt };
        if mine as *const Sched as usize == target {
            return ExternalWait(None);
        }
        let Some(mine) = mine.self_weak.upgrade() else {
            return ExternalWait(None);
        };
        mine.external_waits.fetch_add(1, Ordering::SeqCst);
        ExternalWait(Some(mine))
    }
}

impl Drop for ExternalWait {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.external_waits.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

pub(crate) fn finish<T>(inner: &JoinInner<T>, r: thread::Result<T>) {
    *inner.result.lock() = Some(r);
    // Release: the result is visible to whoever sees `done`.
    inner.done.store(true, Ordering::Release);
    if let Some(w) = inner.waiter.lock().take() {
        w.wake();
    }
}

/// Why a goroutine could not be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpawnError(pub StackError);

impl core::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "cannot start a goroutine: {}", self.0)
    }
}

impl std::error::Error for SpawnError {}

#[track_caller]
fn spawn_on<T: Send + 'static>(
    sched: Option<&Sched>,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    // A match, not a closure, so that the panic points at the caller.
    match try_spawn_on(sched, false, true, f) {
        Ok(h) => h,
        Err(e) => panic!("gokernel: {e}"),
    }
}

#[track_caller]
fn try_spawn_on<T: Send + 'static>(
    sched: Option<&Sched>,
    locked: bool,
    lazy: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, SpawnError> {
    let inner = Arc::new(JoinInner::new(target_sched(sched)));
    // Finishes the handle even if the body never runs (the runtime was
    // dropped first): join then reports RuntimeDropped.
    struct Finisher<T>(Option<Arc<JoinInner<T>>>);
    impl<T> Drop for Finisher<T> {
        fn drop(&mut self) {
            if let Some(inner) = self.0.take() {
                finish(&inner, Err(Box::new(crate::RuntimeDropped)));
            }
        }
    }
    let mut done = Finisher(Some(inner.clone()));
    let body = move || {
        let r = std::panic::catch_unwind(core::panic::AssertUnwindSafe(f));
        let inner = done.0.take().expect("a goroutine body runs once");
        finish(&inner, r);
    };
    // On failure the closure (and with it `f`) is dropped: nothing leaks.
    let id = if locked {
        crate::bound::newproc_locked(sched, body)
    } else {
        newproc(sched, body, lazy)
    }
    .map_err(SpawnError)?;
    Ok(JoinHandle { inner, id })
}

/// True on a goroutine of a gokernel runtime.
fn in_goroutine() -> bool {
    !crate::proc::current_user_g().is_null()
}

/// The scheduler a `go` / `spawn` from here starts its goroutine on: the
/// current goroutine's, or, on an M's own stack (g0: an `after_func`
/// callback, a `systemstack` closure), that M's. Go's `newproc` runs on g0
/// too: there the new goroutine goes to the M's P, or to the global queue
/// when the M holds none (a callback run by an idle M).
///
/// # Panics
///
/// On a thread that is not an M of a runtime, naming `what`.
#[track_caller]
fn spawn_sched(what: &str) -> &'static Sched {
    let gp = getg();
    // SAFETY: a non-null current G has a live M (mstart / execute set it);
    // its scheduler outlives the M, and so this call.
    let rt = unsafe {
        if gp.is_null() || (*gp).m.is_null() {
            core::ptr::null()
        } else {
            (*(*gp).m).rt
        }
    };
    // SAFETY: as above: a non-null scheduler of this M is live.
    match unsafe { rt.as_ref() } {
        Some(s) => s,
        None => panic!(
            "gokernel::{what} called outside a goroutine of a gokernel runtime \
             (start one with Runtime::block_on or Runtime::spawn)"
        ),
    }
}

#[track_caller]
fn require_goroutine(what: &str) {
    assert!(
        in_goroutine(),
        "gokernel::{what} called outside a goroutine of a gokernel runtime \
         (start one with Runtime::block_on or Runtime::spawn)"
    );
}

/// Starts a goroutine running `f` (Go's `go` statement). A panic in it
/// ends the process with the panic message and the goroutine's id.
///
/// Where it runs: the new goroutine takes its P's `runnext`, and an idle
/// thread may take it before it starts; once it has run, it stays on that
/// OS thread for good (unless the runtime was built with the `unsafe`
/// [`Builder::migrate_started_goroutines`]), so thread-locals and
/// thread-keyed state stay coherent across its yields and waits. Its stack
/// has a hardware guard page (unless built with
/// [`Builder::unguarded_stacks`]). It is the stack of a dead goroutine
/// kept for reuse, or, when there is none, one it gets when it first runs
/// ([`lazystack`](crate::lazystack)): a goroutine still waiting to run
/// costs no stack. If none can be allocated then, the process ends with a
/// fatal error naming the goroutine and where it was spawned
/// (`docs/failures.md`); [`try_spawn`] allocates at once and returns the
/// error instead.
///
/// It may also be called on an M's own stack (an
/// [`after_func`](crate::time::after_func) callback, a
/// [`systemstack`](crate::systemstack) closure): the goroutine goes to that
/// M's runtime. So may [`spawn`], [`try_spawn`] and [`spawn_locked`].
///
/// # Panics
///
/// Outside a goroutine (or an M's stack).
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
/// rt.block_on(|| {
///     let done = gokernel::chan::<&str>(0);
///     let d = done.clone();
///     gokernel::go(move || d.send("hello from a goroutine").unwrap());
///     assert_eq!(done.recv().unwrap(), "hello from a goroutine");
/// })
/// .unwrap();
/// ```
#[track_caller]
pub fn go(f: impl FnOnce() + Send + 'static) {
    let sched = spawn_sched("go");
    if let Err(e) = newproc(Some(sched), f, true) {
        panic!("gokernel: {}", SpawnError(e));
    }
}

/// [`spawn`], with the goroutine's stack allocated now (never at its
/// first run, see [`go`]): returns an error when it cannot be. The closure
/// is dropped then; the runtime stays usable.
///
/// # Errors
///
/// [`SpawnError`] if the goroutine's stack cannot be allocated.
///
/// # Panics
///
/// Outside a goroutine.
#[track_caller]
pub fn try_spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, SpawnError> {
    let sched = spawn_sched("try_spawn");
    try_spawn_on(Some(sched), false, false, f)
}

/// [`spawn`] on an OS thread of its own, locked to it as if `f` began with
/// [`lock_os_thread`]: no other goroutine runs on that thread until `f`
/// calls [`unlock_os_thread`] or returns. The thread is an idle one that
/// no started goroutine lives on, or a new one.
///
/// Use this, rather than `lock_os_thread` inside a goroutine, for a
/// goroutine that changes its thread's state (namespaces, credentials,
/// signal masks, a C library's per-thread context): a goroutine that has
/// run lives on the thread it started on, and so may other goroutines
/// that started there; `lock_os_thread` makes those wait until it
/// unlocks (see [`lock_os_thread`]), while here there are none.
///
/// # Panics
///
/// Outside a goroutine (use [`Runtime::spawn_locked`] there), or if its
/// stack cannot be allocated.
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
/// rt.block_on(|| {
///     let main_thread = std::thread::current().id();
///     let h = gokernel::spawn_locked(move || {
///         gokernel::gosched(); // comes back to the same thread
///         std::thread::current().id() != main_thread
///     });
///     assert!(h.join().unwrap(), "a thread of its own");
/// })
/// .unwrap();
/// ```
#[track_caller]
pub fn spawn_locked<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let sched = spawn_sched("spawn_locked");
    match try_spawn_on(Some(sched), true, false, f) {
        Ok(h) => h,
        Err(e) => panic!("gokernel: {e}"),
    }
}

/// Starts a goroutine running `f` and returns a handle to join it. A panic
/// in `f` comes back as `Err` from [`JoinHandle::join`]. Where it runs, and
/// its stack, as for [`go`]: it stays on the thread it first runs on.
///
/// # Panics
///
/// Outside a goroutine (use [`Runtime::spawn`] there).
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
/// rt.block_on(|| {
///     let h = gokernel::spawn(|| 6 * 7);
///     assert_eq!(h.join().unwrap(), 42);
///     let p = gokernel::spawn(|| panic!("boom"));
///     assert!(p.join().is_err()); // the panic comes back, the program goes on
/// })
/// .unwrap();
/// ```
#[track_caller]
pub fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let sched = spawn_sched("spawn");
    spawn_on(Some(sched), f)
}

/// Yields: the current goroutine goes to the back of its thread's queue
/// (with [`Builder::migrate_started_goroutines`], to the back of the global
/// queue, as in Go) and the thread runs something else first.
///
/// # Panics
///
/// Outside a goroutine.
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// rt.block_on(|| {
///     let c = gokernel::chan::<u32>(1);
///     let tx = c.clone();
///     gokernel::go(move || tx.send(1).unwrap());
///     // One P: the new goroutine runs only when this one lets it.
///     while c.is_empty() {
///         gokernel::gosched();
///     }
///     assert_eq!(c.recv(), Ok(1));
/// })
/// .unwrap();
/// ```
#[track_caller]
#[inline]
pub fn gosched() {
    crate::proc::gosched();
}

/// A handle to a goroutine, for its id and for [`unpark`](Self::unpark).
#[derive(Clone)]
pub struct Goroutine {
    id: u64,
    parker: Arc<Parker>,
}

impl Goroutine {
    /// The goroutine's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Makes the goroutine's park token available: if it is parked in
    /// [`park`], it wakes; otherwise its next `park` returns at once. The
    /// token does not accumulate. After the goroutine has finished this
    /// does nothing.
    pub fn unpark(&self) {
        self.parker.unpark();
    }
}

impl core::fmt::Debug for Goroutine {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Goroutine").field("id", &self.id).finish()
    }
}

/// The current goroutine.
///
/// # Panics
///
/// Outside a goroutine.
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
/// rt.block_on(|| {
///     let me = gokernel::current();
///     let h = gokernel::spawn(move || me.unpark());
///     gokernel::park(); // returns once the token is there (now or later)
///     h.join().unwrap();
/// })
/// .unwrap();
/// ```
#[track_caller]
pub fn current() -> Goroutine {
    require_goroutine("current");
    let gp = getg();
    // SAFETY: on a user G (checked).
    let (id, parker) = unsafe { ((*gp).goid(), Parker::current()) };
    Goroutine { id, parker }
}

/// Blocks the current goroutine until its park token is available, then
/// consumes it (std::thread::park's semantics, for goroutines: the M runs
/// other goroutines meanwhile).
///
/// # Panics
///
/// Outside a goroutine.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
///
/// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
/// rt.block_on(|| {
///     let ready = Arc::new(AtomicBool::new(false));
///     let (me, r) = (gokernel::current(), ready.clone());
///     gokernel::go(move || {
///         r.store(true, Ordering::Release);
///         me.unpark();
///     });
///     // A token may be left over from before: check the condition in a loop.
///     while !ready.load(Ordering::Acquire) {
///         gokernel::park();
///     }
/// })
/// .unwrap();
/// ```
#[track_caller]
pub fn park() {
    require_goroutine("park");
    // SAFETY: on a user G (checked); the parker is its own, borrowed
    // only until it returns.
    unsafe { Parker::current_ref().park() }
}

/// The number of goroutines of the current runtime that exist and have not
/// finished.
///
/// # Panics
///
/// Outside a goroutine (use [`Runtime::num_goroutine`] there).
#[track_caller]
pub fn num_goroutine() -> usize {
    require_goroutine("num_goroutine");
    // SAFETY: on a user G (checked): its M's scheduler is live.
    unsafe { (*(*(*getg()).m).rt).ngoroutines() }
}

/// A snapshot of the current runtime's scheduler (see [`Stats`]).
///
/// # Panics
///
/// Outside a goroutine (use [`Runtime::stats`] there).
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let s = rt.block_on(gokernel::stats).unwrap();
/// assert_eq!(s.goroutines.running, 1); // the main goroutine, asking
/// assert_eq!(s.threads, 1);
/// ```
#[track_caller]
pub fn stats() -> Stats {
    require_goroutine("stats");
    // SAFETY: on a user G (checked): its M's scheduler is live.
    unsafe { (*(*(*getg()).m).rt).stats() }
}

/// Every goroutine of every live runtime of the process, as Go prints
/// them on SIGQUIT (see [`Dump`]; [`Runtime::dump`] for one runtime).
/// From any thread, goroutine or not; nothing stops meanwhile. Print it
/// (`eprintln!("{}", gokernel::dump())`) or look at its
/// [`goroutines`](Dump::goroutines).
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// rt.block_on(|| {
///     let me = gokernel::current().id();
///     let d = gokernel::dump();
///     let g = d.goroutine(me).unwrap();
///     assert_eq!(g.status, gokernel::runtime2::status::RUNNING);
///     assert!(d.to_string().contains(&format!("goroutine {me} [running]:")));
/// })
/// .unwrap();
/// ```
pub fn dump() -> Dump {
    crate::signal_unix::live_runtimes()
        .into_iter()
        .map(|s| s.dump())
        .fold(Dump::default(), Dump::merge)
}

/// Wires the current goroutine to its OS thread until the matching
/// [`unlock_os_thread`] (Go's `runtime.LockOSThread`): it runs only on
/// that thread, and the thread runs no other goroutine. Calls nest. A
/// goroutine that exits locked unlocks its thread, which goes back to the
/// pool (Go ends the thread instead); see
/// [`proc::lock_os_thread`](crate::proc::lock_os_thread).
///
/// Every goroutine already stays on the thread it started on (see
/// [`Builder::migrate_started_goroutines`]); what locking adds is that the
/// thread runs nothing else. Other goroutines that started on this thread
/// before the lock cannot move either, so they wait, runnable, until the
/// lock is released or the locked goroutine exits: if the locked goroutine
/// waits for one of them, nothing runs again (reported as a [`Deadlock`]
/// when nothing else can wake it). To lock a thread without neighbours,
/// start the goroutine with [`spawn_locked`].
///
/// # Panics
///
/// Outside a goroutine.
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(2).build().unwrap();
/// rt.block_on(|| {
///     gokernel::lock_os_thread();
///     assert_eq!(gokernel::stats().locked_ms, 1);
///     gokernel::gosched(); // comes back on the same thread
///     gokernel::unlock_os_thread();
///     assert_eq!(gokernel::stats().locked_ms, 0);
/// })
/// .unwrap();
/// ```
#[track_caller]
pub fn lock_os_thread() {
    require_goroutine("lock_os_thread");
    crate::proc::lock_os_thread();
}

/// Undoes one [`lock_os_thread`] (Go's `runtime.UnlockOSThread`); without
/// one it does nothing.
///
/// # Panics
///
/// Outside a goroutine.
///
/// # Example
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// rt.block_on(|| {
///     gokernel::lock_os_thread();
///     gokernel::lock_os_thread();
///     gokernel::unlock_os_thread();
///     assert_eq!(gokernel::stats().locked_ms, 1); // one lock left
///     gokernel::unlock_os_thread();
///     assert_eq!(gokernel::stats().locked_ms, 0);
/// })
/// .unwrap();
/// ```
#[track_caller]
pub fn unlock_os_thread() {
    require_goroutine("unlock_os_thread");
    crate::proc::unlock_os_thread();
}
