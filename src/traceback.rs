//! Goroutine dumps (Go's `traceback.go`: `goroutineheader`,
//! `tracebackothers`): every goroutine of a scheduler with its id, its
//! status or wait reason, how long it has waited and where it was created,
//! in Go's shape:
//!
//! ```text
//! goroutine 7 [chan receive, 3 minutes]:
//! created by src/main.rs:12:9
//! ```
//!
//! [`Sched::dump`] makes one ([`Dump`]); hosted programs call
//! `gokernel::dump()` or `Runtime::dump`, get one in every
//! `Err(Deadlock)`, and can ask for one with SIGQUIT.
//!
//! A dump does not stop the program: it reads each G's status, wait
//! reason, park time and creation site, which are atomics, while the Gs
//! run. So it is a set of per-goroutine snapshots, not one instant: a G
//! may change state while the others are read.
//!
//! # Tracebacks of parked goroutines (hosted)
//!
//! With tracebacks on (`GOKERNEL_TRACEBACK=all`, or
//! `Builder::traceback`), each park records the parking goroutine's stack
//! (a `std::backtrace::Backtrace` captured on its M's system stack, which
//! the CFI unwinds through the switch into the goroutine's own frames), and
//! dumps print it under the goroutine's header, innermost frame first from
//! `gopark`, as Go does. Go walks a parked stack when it dumps (after
//! stopping the world); a running program's parked stack may be resumed
//! at any moment, so gokernel captures it at the park instead. That costs
//! every park an unwinding of its stack (tens of microseconds) and a
//! global lock: a debugging setting. Off (the default), a park pays one
//! load of a flag for it.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::panic::Location;
use core::sync::atomic::Ordering;
use core::time::Duration;

use crate::platform::Platform;
use crate::runtime2::{G, Sched, WaitReason, status};

/// Parked goroutines by [`WaitReason`] ([`Stats::waiting_by_reason`](
/// crate::proc::Stats::waiting_by_reason)).
///
/// ```
/// use gokernel::runtime2::WaitReason;
///
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// rt.block_on(|| {
///     let wg = std::sync::Arc::new(gokernel::sync::WaitGroup::new());
///     wg.add(1);
///     let w = wg.clone();
///     let h = gokernel::spawn(move || w.wait());
///     while gokernel::stats().waiting_by_reason.get(WaitReason::SyncWaitGroupWait) == 0 {
///         gokernel::gosched();
///     }
///     wg.done();
///     h.join().unwrap();
/// })
/// .unwrap();
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitCounts([usize; WaitReason::COUNT]);

impl WaitCounts {
    /// Goroutines parked for `r`.
    pub fn get(&self, r: WaitReason) -> usize {
        self.0[r as usize]
    }

    /// The reasons with at least one goroutine, and their counts.
    pub fn iter(&self) -> impl Iterator<Item = (WaitReason, usize)> + '_ {
        WaitReason::ALL
            .iter()
            .zip(self.0)
            .filter(|&(_, n)| n != 0)
            .map(|(&r, n)| (r, n))
    }

    pub(crate) fn add(&mut self, g: &G) {
        self.0[usize::from(g.waitreason.load(Ordering::Relaxed)) % WaitReason::COUNT] += 1;
    }
}

/// One goroutine in a [`Dump`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GoroutineInfo {
    /// The goroutine id.
    pub id: u64,
    /// Its [`status`] (`RUNNABLE`, `RUNNING` or `WAITING`).
    pub status: u32,
    /// Whether its function has begun. One that has not may have no stack
    /// yet (it gets one when it first runs: [`crate::lazystack`]); the
    /// header says `runnable, not started`.
    pub started: bool,
    /// Why it is parked, if it is (`WAITING`).
    pub wait_reason: Option<WaitReason>,
    /// How long it has been parked, if it is.
    pub waiting_for: Option<Duration>,
    /// Where the `go` / `spawn` that made it was called.
    pub created_by: Option<&'static Location<'static>>,
    /// Its stack when it parked, innermost first, one frame per entry
    /// (`name` and, if known, `\tfile:line:col` on a second line): only
    /// with tracebacks on, hosted, for a parked goroutine.
    pub traceback: Option<Vec<String>>,
}

impl GoroutineInfo {
    /// What goes in the header's brackets: the wait reason (or the
    /// status) and, for a parked goroutine, how long it has waited.
    fn state(&self) -> String {
        use core::fmt::Write;
        let mut s = String::new();
        match self.wait_reason {
            Some(r) if r != WaitReason::Zero => s.push_str(r.as_str()),
            _ => s.push_str(status::name(self.status)),
        }
        if !self.started {
            s.push_str(", not started");
        }
        if let Some(d) = self.waiting_for {
            // Writing to a String cannot fail.
            let _ = write!(s, ", {}", Since(d));
        }
        s
    }
}

impl fmt::Display for GoroutineInfo {
    /// Go's `goroutineheader` line, the traceback (if recorded), then
    /// `created by FILE:LINE:COL`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "goroutine {} [{}]:", self.id, self.state())?;
        for frame in self.traceback.iter().flatten() {
            writeln!(f, "{frame}")?;
        }
        if let Some(site) = self.created_by {
            writeln!(f, "created by {site}")?;
        }
        Ok(())
    }
}

/// A wait's length as Go prints it in a header (`3 minutes`), with
/// seconds and milliseconds below a minute (Go prints nothing there).
struct Since(Duration);

impl fmt::Display for Since {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let (n, unit) = if d.as_secs() >= 60 {
            (d.as_secs() / 60, "minute")
        } else if d.as_secs() >= 1 {
            (d.as_secs(), "second")
        } else {
            return write!(f, "{} ms", d.as_millis());
        };
        write!(f, "{n} {unit}{}", if n == 1 { "" } else { "s" })
    }
}

/// Every goroutine of a scheduler at one time (see the
/// [module docs](self)), ordered by id. `Display` prints them as Go's
/// `SIGQUIT` and deadlock reports do, a blank line between goroutines.
///
/// ```
/// let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
/// let d = rt.block_on(|| {
///     let tx = gokernel::chan::<u8>(0);
///     let rx = tx.clone();
///     let h = gokernel::spawn(move || rx.recv());
///     while gokernel::dump().goroutines().len() < 2
///         || gokernel::stats().waiting_by_reason.get(gokernel::runtime2::WaitReason::ChanReceive) == 0
///     {
///         gokernel::gosched();
///     }
///     let d = gokernel::dump();
///     tx.send(1).unwrap();
///     h.join().unwrap().unwrap();
///     d
/// })
/// .unwrap();
/// let text = d.to_string();
/// assert!(text.contains(" [chan receive, "), "{text}");
/// assert!(text.contains("created by "), "{text}");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dump {
    goroutines: Vec<GoroutineInfo>,
}

impl Dump {
    /// The goroutines, by id.
    pub fn goroutines(&self) -> &[GoroutineInfo] {
        &self.goroutines
    }

    /// The goroutine with id `id`, if it was alive.
    pub fn goroutine(&self, id: u64) -> Option<&GoroutineInfo> {
        self.goroutines.iter().find(|g| g.id == id)
    }

    /// Two dumps as one (several runtimes), by id.
    pub fn merge(mut self, other: Dump) -> Dump {
        self.goroutines.extend(other.goroutines);
        self.goroutines.sort_by_key(|g| g.id);
        self
    }
}

impl fmt::Display for Dump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.goroutines.iter().enumerate() {
            if i != 0 {
                writeln!(f)?;
            }
            write!(f, "{g}")?;
        }
        Ok(())
    }
}

impl Sched {
    /// Every live goroutine of this scheduler (Go's `tracebackothers`,
    /// without stopping anything): see [`Dump`]. It holds the list of Gs
    /// while it reads them, as [`Sched::stats`] does.
    pub fn dump(&self) -> Dump {
        let rate = ticks_rate();
        let now = cputicks();
        let mut goroutines = Vec::new();
        for &gp in self.allgs.lock().iter() {
            // SAFETY: a G in allgs is live while it is listed (we hold the
            // list); only its atomic fields are read.
            let g = unsafe { &*gp };
            if let Some(info) = info(g, now, rate) {
                goroutines.push(info);
            }
        }
        goroutines.sort_by_key(|g| g.id);
        #[cfg(feature = "std")]
        hosted::add_tracebacks(&mut goroutines);
        Dump { goroutines }
    }
}

/// `g` in a dump made at `now` (ticks, at `rate`), or `None` if it is dead
/// or not started.
fn info(g: &G, now: u64, rate: (u64, u64)) -> Option<GoroutineInfo> {
    let st = g.readgstatus();
    if st == status::DEAD || st == status::IDLE {
        return None;
    }
    let (wait_reason, waiting_for) = if st == status::WAITING {
        let r = WaitReason::from_u8(g.waitreason.load(Ordering::Relaxed));
        let since = g.waitsince.load(Ordering::Relaxed);
        (
            Some(r),
            Some(ticks_to_duration(now.saturating_sub(since), rate)),
        )
    } else {
        (None, None)
    };
    Some(GoroutineInfo {
        id: g.goid(),
        status: st,
        started: !g.startfn.is_set(),
        wait_reason,
        waiting_for,
        created_by: g.spawn_site(),
        traceback: None,
    })
}

/// The CPU's time-stamp counter (Go's `cputicks`): what `gopark` records
/// as the time a G parked, being one instruction. Invariant on the CPUs
/// gokernel targets (constant rate, synchronised across cores); a reading
/// taken on another core a little behind only shortens a wait shown.
#[inline(always)]
pub(crate) fn cputicks() -> u64 {
    // SAFETY: RDTSC exists on every x86_64 CPU and has no preconditions.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}

/// A ticks reading and a `nanotime` reading taken together, and the clock
/// read (Go's `ticks`), for converting ticks to time.
static TICKS: spin::Once<(u64, u64, &'static dyn Platform)> = spin::Once::new();

/// Records the first ticks/time pair of the process (each scheduler's
/// construction calls it; the first one counts).
pub(crate) fn ticks_init(platform: &'static dyn Platform) {
    TICKS.call_once(|| (cputicks(), platform.nanotime(), platform));
}

/// The rate of ticks against time (Go's `ticksPerSecond`), measured from
/// the first pair to now, over at least 10 ms (a dump in the first 10 ms
/// of the first scheduler waits for the rest): `(nanoseconds, ticks)`.
fn ticks_rate() -> (u64, u64) {
    let Some(&(t0, n0, clock)) = TICKS.get() else {
        return (0, 1);
    };
    loop {
        let (t1, n1) = (cputicks(), clock.nanotime());
        let dn = n1.saturating_sub(n0);
        if dn >= 10_000_000 {
            return (dn, t1.saturating_sub(t0).max(1));
        }
        core::hint::spin_loop();
    }
}

/// `dt` ticks as a duration, at `rate` (from [`ticks_rate`]).
fn ticks_to_duration(dt: u64, (ns, ticks): (u64, u64)) -> Duration {
    let d = u128::from(dt) * u128::from(ns) / u128::from(ticks);
    Duration::from_nanos(u64::try_from(d).unwrap_or(u64::MAX))
}

/// Called by `gopark` on the parking G, before it parks: records its
/// stack if tracebacks are on (hosted), else one flag load.
#[inline(always)]
pub(crate) fn record_park(gp: *mut G) {
    #[cfg(feature = "std")]
    if hosted::TRACEBACK.load(Ordering::Relaxed) != 0 {
        hosted::record_park_slow(gp);
    }
    #[cfg(not(feature = "std"))]
    let _ = gp;
}

#[cfg(feature = "std")]
pub(crate) mod hosted {
    //! The recorded stacks of parked goroutines.

    use alloc::string::{String, ToString};
    use alloc::sync::Arc;
    use alloc::vec::Vec;
    use core::sync::atomic::{AtomicUsize, Ordering};
    use std::backtrace::Backtrace;
    use std::collections::HashMap;

    use super::GoroutineInfo;
    use crate::runtime2::G;

    /// Holders of tracebacks-on: the environment (once) and each runtime
    /// built with `Builder::traceback(true)` while it lives. Nonzero: every
    /// park records its stack.
    pub(crate) static TRACEBACK: AtomicUsize = AtomicUsize::new(0);

    /// The environment variable that turns tracebacks on (`all`).
    pub(crate) const TRACEBACK_ENV: &str = "GOKERNEL_TRACEBACK";

    /// The last park's stack of each G, by G address, with the goid it
    /// was taken for (a G reused since no longer matches).
    type Stacks = HashMap<usize, (u64, Arc<Backtrace>)>;
    static STACKS: std::sync::Mutex<Option<Stacks>> = std::sync::Mutex::new(None);

    /// Turns tracebacks on if `GOKERNEL_TRACEBACK=all` (checked once per
    /// process); returns whether the environment asked.
    pub(crate) fn traceback_from_env() -> bool {
        static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ENV.get_or_init(|| {
            let on = std::env::var(TRACEBACK_ENV).is_ok_and(|v| v.trim() == "all");
            if on {
                TRACEBACK.fetch_add(1, Ordering::Relaxed);
            }
            on
        })
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn record_park_slow(gp: *mut G) {
        // On the system stack: unwinding needs room the G may not have,
        // and the CFI carries the walk back into the G's frames.
        let bt = crate::systemstack(Backtrace::force_capture);
        // SAFETY: gp is the running G (gopark's caller).
        let goid = unsafe { (*gp).goid() };
        let mut st = STACKS.lock().unwrap_or_else(|e| e.into_inner());
        st.get_or_insert_with(HashMap::new)
            .insert(gp as usize, (goid, Arc::new(bt)));
    }

    /// Fills in the recorded stacks of the parked goroutines in `gs`.
    pub(crate) fn add_tracebacks(gs: &mut [GoroutineInfo]) {
        if TRACEBACK.load(Ordering::Relaxed) == 0 {
            return;
        }
        // The stacks are taken under the lock, rendered (symbolized, which
        // is slow) outside it.
        let found: Vec<(usize, Arc<Backtrace>)> = {
            let st = STACKS.lock().unwrap_or_else(|e| e.into_inner());
            let Some(st) = st.as_ref() else { return };
            let by_goid: HashMap<u64, &Arc<Backtrace>> =
                st.values().map(|(id, bt)| (*id, bt)).collect();
            gs.iter()
                .enumerate()
                .filter(|(_, g)| g.wait_reason.is_some())
                .filter_map(|(i, g)| by_goid.get(&g.id).map(|bt| (i, Arc::clone(bt))))
                .collect()
        };
        for (i, bt) in found {
            gs[i].traceback = Some(frames(&bt.to_string()));
        }
    }

    /// A rendered `Backtrace` in Go's shape, from `gopark` out: each
    /// frame's name, then `\tfile:line:col` when known.
    pub(crate) fn frames(bt: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for line in bt.lines() {
            let t = line.trim_start();
            if let Some(at) = t.strip_prefix("at ") {
                if let Some(last) = out.last_mut() {
                    last.push_str("\n\t");
                    last.push_str(at);
                }
            } else if let Some((num, name)) = t.split_once(": ")
                && num.parse::<usize>().is_ok()
            {
                out.push(name.trim().to_string());
            }
        }
        // The frames above gopark are the recording itself.
        if let Some(p) = out
            .iter()
            .position(|f| is_frame(f, "gokernel::proc::gopark"))
        {
            out.drain(..p);
        }
        out
    }

    /// Whether frame `f` is function `name` (optimised builds drop the
    /// module path of inlined frames).
    fn is_frame(f: &str, name: &str) -> bool {
        let fname = f.split('\n').next().unwrap_or("");
        let short = name.rsplit("::").next().unwrap_or(name);
        fname == name || fname == short || fname.ends_with(&alloc::format!("::{short}"))
    }
}
