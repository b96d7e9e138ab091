//! CPU mode (`--cpus`): the platform starts no threads; the image starts
//! two "CPUs" itself (clone(2) threads, each with its TLS block in FS and
//! an alternate signal stack) that call `gokernel::cpu::join`. POSIX
//! signals stand in for interrupts: a handler that calls the
//! interrupt-safe `gokernel::intr` API, sent with `tgkill` to a CPU at
//! arbitrary points — while it runs a goroutine, the scheduler (holding
//! its lock, in the middle of a run-queue operation), or sleeps idle.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use gokernel::cpu::{GoLockedError, try_go_locked};
use gokernel::intr::{IrqEvent, IrqWork};
use gokernel::platform::Platform;
use gokernel::proc::{Parker, gosched, lock_os_thread, unlock_os_thread};
use gokernel::runtime2::Sched;
use gokernel::tls::fs0;

use crate::platform::{IMAGE, NONM_SLEEPS, set_fs, spawn_thread};
use crate::sys;

/// CPUs the image starts.
pub const NCPUS: usize = 2;

/// Their thread ids.
pub static CPU_TIDS: [AtomicUsize; NCPUS] = [const { AtomicUsize::new(0) }; NCPUS];
/// CPUs whose `join` has returned (bumped, then woken, as each leaves).
pub static CPUS_LEFT: AtomicU32 = AtomicU32::new(0);
/// The scheduler the CPUs join and the handler posts to.
static SCHED: AtomicPtr<Sched> = AtomicPtr::new(core::ptr::null_mut());

fn sched() -> &'static Sched {
    // SAFETY: set once to a leaked ('static) scheduler before any CPU
    // starts or any signal is sent.
    unsafe { &*SCHED.load(Ordering::Acquire) }
}

/// Signals the handler has run (any signal).
pub static HANDLED: AtomicU32 = AtomicU32::new(0);
/// What the last run of [`STORM_WORK`] saw of `HANDLED`.
pub static WORK_SEEN: AtomicU32 = AtomicU32::new(0);
/// Runs of [`STORM_WORK`].
pub static WORK_RUNS: AtomicU32 = AtomicU32::new(0);

/// Posted by every signal: records how many signals had been handled when
/// it ran (so the last post is known to have been followed by a run).
static STORM_WORK: IrqWork = IrqWork::new(|| {
    WORK_RUNS.fetch_add(1, Ordering::Relaxed);
    WORK_SEEN.fetch_max(HANDLED.load(Ordering::SeqCst), Ordering::SeqCst);
    IMAGE.futexwakeup(&WORK_RUNS, 1);
});
/// Signalled by SIGUSR2: the event the ready-from-interrupt checks wait on.
static TEST_EV: IrqEvent = IrqEvent::new();

/// The "interrupt handler": SIGUSR1 posts the work item, SIGUSR2 also
/// signals the event. It runs on the CPU's alternate stack, at any point
/// of the CPU's code.
extern "C" fn on_signal(sig: i32) {
    HANDLED.fetch_add(1, Ordering::SeqCst);
    if sig as usize == sys::SIGUSR2 {
        TEST_EV.signal();
    }
    STORM_WORK.post(sched());
}

/// A CPU: sets FS the chosen way, records what it sees, takes an
/// alternate signal stack, and joins the scheduler until it shuts down.
extern "C" fn cpu_entry(i: usize) -> ! {
    let tp = fs0();
    // SAFETY: tp is this thread's TLS block (made by spawn_thread, leaked).
    unsafe { set_fs(tp) };
    crate::platform::record_m(tp);
    if sys::sigaltstack(64 * 1024) != 0 {
        gokernel::panic::throw("sigaltstack failed");
    }
    let _ = i;
    // SAFETY: FS is this thread's own TLS block, it runs nothing else of
    // gokernel's, its stack is a 256 KiB g0 stack, and the signal handler
    // calls only intr's interrupt-safe calls.
    unsafe { gokernel::cpu::join(sched()) };
    CPUS_LEFT.fetch_add(1, Ordering::SeqCst);
    IMAGE.futexwakeup(&CPUS_LEFT, 1);
    loop {
        // SAFETY: exit(2) ends only the calling thread.
        unsafe { sys::syscall6(sys::SYS_EXIT, [0; 6]) };
    }
}

/// Installs the handler and starts the CPUs on `s`.
pub fn start(s: &'static Sched) -> bool {
    SCHED.store(s as *const Sched as *mut Sched, Ordering::Release);
    // SAFETY: the handler only touches atomics and intr's interrupt-safe
    // calls, so it may run anywhere.
    let ok = unsafe {
        sys::sigaction(sys::SIGUSR1, on_signal) == 0 && sys::sigaction(sys::SIGUSR2, on_signal) == 0
    };
    if !ok {
        return false;
    }
    for (i, tid) in CPU_TIDS.iter().enumerate() {
        match spawn_thread(cpu_entry, i) {
            Ok(t) => tid.store(t, Ordering::Release),
            Err(_) => return false,
        }
    }
    true
}

pub(crate) fn cpu_tid(i: usize) -> usize {
    CPU_TIDS[i % NCPUS].load(Ordering::Acquire)
}

// ---------------------------------------------------------------------
// The storm: signals at arbitrary points while the scenarios run.

static STORM_STOP: AtomicBool = AtomicBool::new(false);
static STORM_DONE: AtomicU32 = AtomicU32::new(0);
/// Signals the storm sent.
pub static STORM_SENT: AtomicU32 = AtomicU32::new(0);

/// The storm thread (not an M): SIGUSR1 to the CPUs in turn, with a few
/// microseconds of jitter between, until told to stop.
extern "C" fn storm_entry(_: usize) -> ! {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut i = 0;
    while !STORM_STOP.load(Ordering::Relaxed) {
        // xorshift: how long to wait before the next signal.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let until = IMAGE.nanotime() + 20_000 + x % 200_000;
        while IMAGE.nanotime() < until {
            core::hint::spin_loop();
        }
        if sys::tgkill(cpu_tid(i), sys::SIGUSR1) == 0 {
            STORM_SENT.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
    }
    STORM_DONE.store(1, Ordering::Release);
    IMAGE.futexwakeup(&STORM_DONE, 1);
    loop {
        // SAFETY: exit(2) ends only the calling thread.
        unsafe { sys::syscall6(sys::SYS_EXIT, [0; 6]) };
    }
}

pub fn storm_start() -> bool {
    spawn_thread(storm_entry, 0).is_ok()
}

/// Stops the storm and waits (up to 5 s) until the work item has run
/// after the last signal was handled: a post that an interrupt made and
/// no M ever ran would leave `WORK_SEEN` behind. Returns (signals sent,
/// handled, work runs, whether the last post ran).
pub fn storm_stop() -> (u32, u32, u32, bool) {
    STORM_STOP.store(true, Ordering::Relaxed);
    while STORM_DONE.load(Ordering::Acquire) == 0 {
        IMAGE.futexsleep(&STORM_DONE, 0, Some(10_000_000));
    }
    let deadline = IMAGE.nanotime() + 5_000_000_000;
    let caught_up = loop {
        let runs = WORK_RUNS.load(Ordering::SeqCst);
        if WORK_SEEN.load(Ordering::SeqCst) == HANDLED.load(Ordering::SeqCst) {
            break true;
        }
        if IMAGE.nanotime() > deadline {
            break false;
        }
        IMAGE.futexsleep(&WORK_RUNS, runs, Some(10_000_000));
    };
    (
        STORM_SENT.load(Ordering::Relaxed),
        HANDLED.load(Ordering::SeqCst),
        WORK_RUNS.load(Ordering::Relaxed),
        caught_up,
    )
}

// ---------------------------------------------------------------------
// Interrupts readying a goroutine.

/// Rounds of each ready-from-interrupt check.
pub const IRQ_ROUNDS: u32 = 300;

/// Waits (futex, up to `secs`) until `w` reaches `n`.
pub(crate) fn wait_for(w: &AtomicU32, n: u32, secs: u64) -> bool {
    let deadline = IMAGE.nanotime() + secs * 1_000_000_000;
    loop {
        let v = w.load(Ordering::Acquire);
        if v >= n {
            return true;
        }
        if IMAGE.nanotime() > deadline {
            return false;
        }
        IMAGE.futexsleep(w, v, Some(10_000_000));
    }
}

/// A goroutine waits on [`TEST_EV`] `IRQ_ROUNDS` times; the main thread
/// sends SIGUSR2 to a CPU (alternating) and waits for each wake-up. With
/// `busy`, two goroutines keep both CPUs busy meanwhile (yielding, so
/// the signals land in the scheduler too); without, the CPUs are idle
/// (every P idle and both CPU threads asleep in the kernel) before each
/// signal. Returns (wake-ups seen, rounds where both CPUs were seen
/// asleep before the signal).
pub fn ready_from_interrupt(s: &'static Sched, busy: bool) -> (u32, u32) {
    let woke = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let left = Arc::new(AtomicU32::new(0));
    // Round 0's signal may come before the waiter's first wait: it is
    // kept, and that wait returns at once.
    let w = woke.clone();
    s.go(Box::new(move || {
        for _ in 0..=IRQ_ROUNDS {
            TEST_EV.wait(s);
            w.fetch_add(1, Ordering::Release);
            IMAGE.futexwakeup(&w, 1);
        }
    }))
    .expect("spawn the waiter");
    sys::tgkill(cpu_tid(0), sys::SIGUSR2);
    if !wait_for(&woke, 1, 10) {
        return (0, 0);
    }
    if busy {
        for _ in 0..NCPUS {
            let (stop, left) = (stop.clone(), left.clone());
            left.fetch_add(1, Ordering::SeqCst);
            s.go(Box::new(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n = n.wrapping_add(1);
                    if n.is_multiple_of(64) {
                        gosched();
                    }
                    core::hint::spin_loop();
                }
                left.fetch_sub(1, Ordering::SeqCst);
                IMAGE.futexwakeup(&left, 1);
            }))
            .expect("spawn a busy goroutine");
        }
    }
    let mut asleep = 0;
    let mut seen = woke.load(Ordering::Acquire);
    for i in 0..IRQ_ROUNDS {
        if !busy && all_cpus_asleep(s) {
            asleep += 1;
        }
        sys::tgkill(cpu_tid(i as usize), sys::SIGUSR2);
        // A signal that arrives while the waiter is being woken merges
        // into that wake-up; here each is sent only after the last wake.
        if !wait_for(&woke, seen + 1, 10) {
            break;
        }
        seen = woke.load(Ordering::Acquire);
    }
    stop.store(true, Ordering::Relaxed);
    while left.load(Ordering::SeqCst) != 0 {
        IMAGE.futexsleep(&left, left.load(Ordering::SeqCst), Some(10_000_000));
    }
    (seen - 1, asleep)
}

/// Waits (up to 1 s) until every P is idle and every CPU thread sleeps
/// in the kernel (state `S`); true if it happened.
pub(crate) fn all_cpus_asleep(s: &Sched) -> bool {
    let deadline = IMAGE.nanotime() + 1_000_000_000;
    let zero = AtomicU32::new(0);
    while IMAGE.nanotime() < deadline {
        let st = s.stats();
        if st.idle_ps == st.procs
            && (0..NCPUS).all(|i| sys::thread_stat(cpu_tid(i)).is_some_and(|(c, _)| c == b'S'))
        {
            return true;
        }
        IMAGE.futexsleep(&zero, 0, Some(200_000));
    }
    false
}

// ---------------------------------------------------------------------
// LockOSThread with no threads to start.

/// The id of the M running the current goroutine.
fn m_id() -> i64 {
    // SAFETY: on a goroutine: its M is live.
    unsafe { (*(*gokernel::getg()).m()).id() }
}

/// From a goroutine on one CPU while the other is idle with nothing bound
/// to it: `try_go_locked` takes that CPU (the goroutine runs there,
/// locked, on another M than ours); while it holds it (locked, parked),
/// a second `try_go_locked` has no CPU and says so at once. Returns
/// (first result ok, locked G on another M and locked, second result).
pub fn go_locked_cpus(s: &'static Sched) -> Option<(bool, bool, Result<u64, GoLockedError>)> {
    crate::checks::run_g(s, 20, move || {
        let me = m_id();
        // The other CPU may still be spinning after starting us: wait
        // until it is idle (on the idle list), as the check needs.
        let deadline = IMAGE.nanotime() + 5_000_000_000;
        while s.stats().idle_ms == 0 && IMAGE.nanotime() < deadline {
            gosched();
        }
        // SAFETY: on a goroutine.
        let main = unsafe { Parker::current() };
        let info: Arc<spin::Mutex<Option<(i64, usize)>>> = Arc::new(spin::Mutex::new(None));
        let slot: Arc<spin::Mutex<Option<Arc<Parker>>>> = Arc::new(spin::Mutex::new(None));
        let (i2, s2, m2) = (info.clone(), slot.clone(), main.clone());
        let first = try_go_locked(
            s,
            Box::new(move || {
                // SAFETY: on a goroutine.
                let me = unsafe { Parker::current() };
                // What it saw first, then the parker that says it is there.
                *i2.lock() = Some((m_id(), s.stats().locked_ms));
                *s2.lock() = Some(me.clone());
                m2.unpark();
                // SAFETY: our own parker.
                unsafe { me.park() };
            }),
        );
        let peer = loop {
            if let Some(p) = slot.lock().clone() {
                break p;
            }
            // SAFETY: our own parker; the locked goroutine unparks it.
            unsafe { main.park() };
        };
        let second = try_go_locked(s, Box::new(|| {}));
        peer.unpark();
        let locked_elsewhere = info
            .lock()
            .is_some_and(|(m, locked)| m != me && locked == 1);
        (first.is_ok(), locked_elsewhere, second)
    })
}

/// `lock_os_thread` in a goroutine: the goroutine's CPU runs only it;
/// it keeps its M (and TLS block) across 200 parks woken from the other
/// CPU, and the Ms never outnumber the CPUs meanwhile. Returns (same M
/// throughout, most Ms seen).
pub fn locked_on_cpu(s: &'static Sched) -> Option<(bool, usize)> {
    crate::checks::run_g(s, 20, move || {
        lock_os_thread();
        let (m, tp) = (m_id(), fs0());
        let mut same = true;
        let mut most = 0;
        for _ in 0..200 {
            // SAFETY: on a goroutine.
            let me = unsafe { Parker::current() };
            let waker = me.clone();
            s.go(Box::new(move || waker.unpark()))
                .expect("spawn the waker");
            // SAFETY: our own parker.
            unsafe { me.park() };
            same &= m_id() == m && fs0() == tp;
            most = most.max(s.stats().threads);
        }
        unlock_os_thread();
        (same, most)
    })
}

// ---------------------------------------------------------------------
// A plain thread blocked on a channel sleeps.

static PLAIN_CHAN: AtomicPtr<gokernel::Chan<u32>> = AtomicPtr::new(core::ptr::null_mut());
static PLAIN_GOT: AtomicU32 = AtomicU32::new(0);

/// A thread that is not an M: receives one value on [`PLAIN_CHAN`].
extern "C" fn plain_entry(_: usize) -> ! {
    // SAFETY: set before the thread starts, leaked.
    let c = unsafe { &*PLAIN_CHAN.load(Ordering::Acquire) };
    let v = c.recv().unwrap_or(0);
    PLAIN_GOT.store(v, Ordering::Release);
    IMAGE.futexwakeup(&PLAIN_GOT, 1);
    loop {
        // SAFETY: exit(2) ends only the calling thread.
        unsafe { sys::syscall6(sys::SYS_EXIT, [0; 6]) };
    }
}

/// A thread that is not an M blocks on an empty channel; once the kernel
/// shows it asleep, its CPU time is read twice 300 ms apart (a spinning
/// thread would use about 30 ticks), then a goroutine sends. Returns
/// (state seen, ticks used while blocked, futexsleep calls by non-M
/// threads meanwhile, value received).
pub fn plain_thread_sleeps(s: &'static Sched) -> (u8, u64, u32, u32) {
    let c = Box::leak(Box::new(gokernel::chan::<u32>(0)));
    PLAIN_CHAN.store(c, Ordering::Release);
    let before = NONM_SLEEPS.load(Ordering::Relaxed);
    let Ok(tid) = spawn_thread(plain_entry, 0) else {
        return (b'?', u64::MAX, 0, 0);
    };
    let zero = AtomicU32::new(0);
    let deadline = IMAGE.nanotime() + 5_000_000_000;
    let mut st = sys::thread_stat(tid);
    while st.is_none_or(|(c, _)| c != b'S') && IMAGE.nanotime() < deadline {
        IMAGE.futexsleep(&zero, 0, Some(1_000_000));
        st = sys::thread_stat(tid);
    }
    let (state, t0) = st.unwrap_or((b'?', 0));
    IMAGE.futexsleep(&zero, 0, Some(300_000_000));
    let (state2, t1) = sys::thread_stat(tid).unwrap_or((b'?', u64::MAX));
    let sleeps = NONM_SLEEPS.load(Ordering::Relaxed) - before;
    let state = if state == state2 { state } else { state2 };
    let sender: &'static gokernel::Chan<u32> = c;
    s.go(Box::new(move || {
        sender.send(7).expect("send to the plain thread")
    }))
    .expect("spawn the sender");
    wait_for(&PLAIN_GOT, 7, 10);
    (
        state,
        t1.saturating_sub(t0),
        sleeps,
        PLAIN_GOT.load(Ordering::Acquire),
    )
}

/// Waits (up to 10 s) until every CPU's `join` has returned.
pub fn wait_cpus_left() -> u32 {
    wait_for(&CPUS_LEFT, NCPUS as u32, 10);
    CPUS_LEFT.load(Ordering::SeqCst)
}
