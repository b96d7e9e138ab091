//! gokernel: Go's goroutine runtime for Rust on x86_64 — goroutines,
//! channels, `select!`, `sync` and timers, scheduled as Go schedules them,
//! on Linux (the `std` feature, on by default) or bare metal (`no_std`).
//!
#![cfg_attr(
    feature = "std",
    doc = r#"
# A first program

A [`Runtime`] owns the threads; [`Runtime::block_on`] runs the main
goroutine; [`go`] starts more; [`chan()`] makes a channel and
[`select!`] waits on several:

```
use gokernel::{Runtime, chan, go, select};
use std::time::Duration;

let rt = Runtime::builder().procs(2).build().unwrap();
let total = rt
    .block_on(|| {
        let results = chan::<u64>(0);
        for i in 1..=10u64 {
            let results = results.clone();
            go(move || results.send(i * i).unwrap());
        }
        let timeout = gokernel::after(Duration::from_secs(10));
        let mut total = 0;
        for _ in 0..10 {
            select! {
                recv(results) -> v => total += v.unwrap(),
                recv(timeout) -> _t => panic!("too slow"),
            }
        }
        total
    })
    .expect("a deadlock: every goroutine waited for ever");
assert_eq!(total, 385);
```

The main goroutine can borrow from the caller with [`Runtime::scope`]
(as `std::thread::scope`):

```
let rt = gokernel::Runtime::builder().build().unwrap();
let names = vec!["ann", "bob"];
let lens = rt.scope(|s| {
    let hs: Vec<_> = names.iter().map(|n| s.spawn(move || n.len())).collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
});
assert_eq!(lens, [3, 3]);
```

Where to go next:

- goroutines: [`go`], [`spawn`] and [`JoinHandle`], [`gosched`],
  [`current`] / [`park`] / [`Goroutine::unpark`], [`lock_os_thread`]
  (the [`runtime`] module: hosted API and its guarantees);
- communication: [`Chan`] / [`chan()`], [`select!`], and [`sync`]'s
  [`Mutex`](sync::Mutex), [`WaitGroup`](sync::WaitGroup),
  [`Once`](sync::Once);
- time: [`sleep`], [`after`], [`after_func`](time::after_func);
- when something goes wrong: [`Deadlock`] (Go's "all goroutines are
  asleep" report, with every goroutine's wait reason and creation
  site), [`dump`] (and SIGQUIT) for a goroutine dump, [`stats`],
  `GOKERNEL_SCHEDTRACE=<ms>` and `GOKERNEL_TRACEBACK=all`;
  `docs/failures.md` lists every failure and what it prints.

Go's rules carry over with one difference to know: a goroutine that
blocks its thread (a blocking system call, a `std` lock, a busy loop)
keeps its P, so with `procs` of them nothing else runs; and a goroutine
that has started stays on its OS thread (so thread-locals work) — see
[`go`] and the README.

"#
)]
#![cfg_attr(
    not(feature = "std"),
    doc = r#"
These docs are built without the `std` feature: the hosted API
(`Runtime`, `go`, `spawn`, `Runtime::scope`, `dump`, …) and its examples
are in the default build's docs. Bare-metal programs drive the layers
below through [`Sched`](runtime2::Sched).

"#
)]
//! # Layers
//!
//! - [`runtime2`]: the `#[repr(C)]` data — [`Gobuf`](runtime2::Gobuf),
//!   [`Stack`](runtime2::Stack), [`G`](runtime2::G), [`M`](runtime2::M),
//!   [`P`](runtime2::P) — and the named offsets the assembly uses
//!   (published in `docs/offsets.md`, `.inc` and `.h`).
//! - [`asm_amd64`]: the only code that switches stacks — [`gogo`],
//!   [`mcall`], [`systemstack`](asm_amd64::systemstack), and the entry and
//!   exit trampolines — as naked functions, with their register contracts
//!   and the stack diagrams.
//! - [`tls`]: the current G in one thread-local slot reached through FS
//!   ([`getg`]).
//! - [`proc`]: starting an M on its g0 ([`mstart`](proc::mstart)), making
//!   Gs ([`malg`](proc::malg), [`gostartcallfn`](proc::gostartcallfn)),
//!   running them ([`execute`](proc::execute)) and their exit.
//! - [`runq`]: a P's run queue (ring of 256 + `runnext`), model-checked
//!   with loom; [`proc`] also holds the scheduler proper (`newproc`,
//!   `schedule`, `findrunnable`, work stealing, spinning Ms, `gopark` /
//!   `goready`), locked Gs ([`lock_os_thread`](proc::lock_os_thread)),
//!   introspection ([`Stats`](proc::Stats), [`schedtrace`](proc::schedtrace))
//!   and [`Sched`](runtime2::Sched).
//! - [`time`]: timers — a heap per P run by `schedule` /
//!   `findrunnable`, [`sleep`], [`after_func`](time::after_func), and the
//!   idle M that sleeps until the next deadline instead of spinning.
//! - [`netpoll`]: Go's network poller as a seam ([`Netpoll`](netpoll::Netpoll):
//!   `netpollopen`, `netpoll(delay)`, `netpollbreak`; [`PollDesc`](netpoll::PollDesc)),
//!   polled by `findrunnable` and by the idle M instead of its futex sleep;
//!   hosted, epoll, and `net` (`std`): `TcpListener`, `TcpStream`,
//!   `UdpSocket` whose calls park the goroutine; bare metal,
//!   [`netpoll_irq`]: device sources that interrupt handlers signal.
//! - [`syscall`](mod@syscall) ([`blocking`], Go's `entersyscall` /
//!   `exitsyscall`) and [`sysmon`] (retaking Ps from calls, time slices,
//!   the stall detector): the other half of Go's scheduler.
//! - [`platform`]: what the scheduler needs from its world (threads,
//!   futexes, a monotonic clock, CPU count); `lock_futex` (internal): how
//!   idle Ms sleep; [`cpu`]: a kernel's CPUs joining as the Ms;
//!   [`intr`]: interrupt handlers waking goroutines (`docs/interrupts.md`).
//! - [`stack`]: goroutine stacks: a guard page below every stack, as many
//!   as `vm.max_map_count` allows; arena stacks with soft guards only behind
//!   an `unsafe` opt-in. [`lazystack`]: a goroutine spawned when no dead G
//!   has a stack gets one when it first runs.
//! - [`panic`](mod@panic): fatal errors (`throw`) and the named sinks for misuse.
//! - [`chan`](mod@chan) (channels), [`select`](mod@select) (`select!`),
//!   [`sync`] (`Mutex`, `WaitGroup`, `Once`): Go's toolkit, built on
//!   [`sema`] (sudogs and wait queues over `gopark` / `goready`); with or
//!   without `std`, from goroutines and from plain threads.
//! - [`traceback`]: goroutine dumps ([`Dump`]) and wait reasons.
#![cfg_attr(
    feature = "std",
    doc = r#"- Hosted (`std`), [`runtime`]: [`Runtime`], [`go`], [`spawn`],
  [`JoinHandle`], [`park`], [`current`], [`lock_os_thread`], [`stats`],
  [`dump`] — the API most programs use ([`sleep`] works with and
  without `std`); [`scope`]: [`Runtime::scope`];
  `GOKERNEL_SCHEDTRACE=<ms>` prints Go's schedtrace lines."#
)]
#![cfg_attr(
    not(feature = "std"),
    doc = "- Hosted (`std`, not in this build): `Runtime`, `go`, `spawn`, `dump`, `Runtime::scope` and the rest of the everyday API."
)]
//!
//! [`gogo`]: asm_amd64::gogo
//! [`mcall`]: asm_amd64::mcall
//!
//! # The lower layers by hand
//!
//! Bare-metal embedders drive the layers directly. Run a goroutine on an M
//! made from the current thread; it hops onto the M's system stack and
//! back, and when it returns the M ends:
//!
//! ```
//! use gokernel::proc::{execute, gostartcallfn, malg, mstart, newgoid};
//! use gokernel::runtime2::{M, status};
//! use gokernel::{getg, systemstack};
//!
//! let mut g = malg(64 * 1024).unwrap();
//! g.set_goid(newgoid());
//! let gp: *mut _ = &mut *g;
//! // SAFETY: the G is new and its stack unused.
//! unsafe {
//!     gostartcallfn(gp, Box::new(|| {
//!         let me = getg();
//!         let on_g0 = systemstack(move || getg() != me);
//!         assert!(on_g0);
//!     }))
//! };
//! let mut m = M::new(1);
//! // SAFETY: this thread runs no other M; `m` and `g` outlive the call.
//! unsafe { mstart(&mut *m, || execute(gp, false)) };
//! assert_eq!(g.readgstatus(), status::DEAD);
//! ```
//!
//! # Migration and thread-locals
//!
//! A G may resume on another M (another OS thread). [`getg`] re-reads the
//! FS-relative slot on every call, so it is always right; values derived
//! from thread-locals of the Rust standard library (`thread_local!`) are
//! not re-derived by the compiler across a switch, so Gs should not hold
//! references to them across a point where they may move.
#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod asm_amd64;
pub mod bound;
pub mod chan;
pub mod cpu;
mod gslab;
pub mod intr;
pub mod lazystack;
pub(crate) mod lock_futex;
#[cfg(feature = "std")]
pub mod net;
pub mod netpoll;
#[cfg(feature = "std")]
mod netpoll_epoll;
pub mod netpoll_irq;
pub mod panic;
mod park;
pub mod platform;
pub mod preempt;
pub mod proc;
pub mod runq;
#[cfg(feature = "std")]
pub mod runtime;
pub mod runtime2;
#[cfg(feature = "std")]
pub mod scope;
pub mod select;
pub mod sema;
#[cfg(feature = "std")]
mod signal_unix;
mod spawning;
pub mod stack;
#[cfg(feature = "std")]
mod stall;
mod stubs;
pub mod sync;
pub mod syscall;
pub mod sysmon;
pub mod teardown;
pub mod time;
pub mod tls;
pub mod trace;
pub mod traceback;

pub use chan::{Chan, CloseError, RecvError, SendError, TryRecvError, TrySendError, chan};
#[cfg(feature = "std")]
pub use runtime::{
    BuildError, Builder, Deadlock, Goroutine, JoinHandle, MAX_PROCS, Runtime, SpawnError, current,
    dump, go, gosched, lock_os_thread, num_goroutine, park, spawn, spawn_locked, stats, try_spawn,
    unlock_os_thread,
};
pub use runtime2::WaitReason;
#[cfg(feature = "std")]
pub use scope::{Scope, ScopedJoinHandle};
pub use stubs::systemstack;
pub use syscall::blocking;
pub use teardown::{RuntimeDropped, shutting_down};
pub use time::{after, sleep};
pub use tls::getg;
pub use traceback::{Dump, GoroutineInfo};
