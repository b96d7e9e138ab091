//! gokernel: Go's goroutine kernel for x86_64, as a `#![no_std]` crate.
//!
//! gokernel brings the machinery of Go's runtime — G (goroutine), M
//! (worker), P (processor); `gogo`, `mcall`, `systemstack` — to Rust
//! programs: bare-metal kernels and unikernels link it without `std`,
//! and hosted Linux programs use it with the `std` feature (on by default).
//!
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
//! - [`syscall`](mod@syscall) ([`blocking`], Go's `entersyscall` /
//!   `exitsyscall`) and [`sysmon`] (retaking Ps from calls, time slices,
//!   the stall detector): the other half of Go's scheduler.
//! - [`platform`]: what the scheduler needs from its world (threads,
//!   futexes, a monotonic clock, CPU count); `lock_futex` (internal): how
//!   idle Ms sleep.
//! - [`stack`]: goroutine stacks: a guard page below every stack, as many
//!   as `vm.max_map_count` allows; arena stacks with soft guards only behind
//!   an `unsafe` opt-in.
//! - [`panic`](mod@panic): fatal errors (`throw`) and the named sinks for misuse.
//! - [`chan`](mod@chan) (channels), [`select`](mod@select) (`select!`),
//!   [`sync`] (`Mutex`, `WaitGroup`, `Once`): Go's toolkit, built on
//!   [`sema`] (sudogs and wait queues over `gopark` / `goready`); with or
//!   without `std`, from goroutines and from plain threads.
//! - Hosted (`std`): `Runtime`, `go`, `spawn`, `JoinHandle`,
//!   `park`, `current`, `lock_os_thread`, `stats` — the API most programs
//!   use ([`sleep`] works with and without `std`);
//!   `GOKERNEL_SCHEDTRACE=<ms>` prints Go's schedtrace lines.
//!
//! [`gogo`]: asm_amd64::gogo
//! [`mcall`]: asm_amd64::mcall
//!
//! # Example
//!
//! Run a goroutine on an M made from the current thread; it hops onto the
//! M's system stack and back, and when it returns the M ends:
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
pub(crate) mod lock_futex;
pub mod panic;
pub mod platform;
pub mod proc;
pub mod runq;
#[cfg(feature = "std")]
mod runtime;
pub mod runtime2;
pub mod select;
pub mod sema;
#[cfg(feature = "std")]
mod signal_unix;
pub mod stack;
mod stubs;
pub mod sync;
pub mod syscall;
pub mod sysmon;
pub mod teardown;
pub mod time;
pub mod tls;

pub use chan::{Chan, CloseError, RecvError, SendError, TryRecvError, TrySendError, chan};
#[cfg(feature = "std")]
pub use runtime::{
    BuildError, Builder, Deadlock, Goroutine, JoinHandle, MAX_PROCS, Runtime, SpawnError, current,
    go, gosched, lock_os_thread, num_goroutine, park, spawn, spawn_locked, stats, try_spawn,
    unlock_os_thread,
};
pub use stubs::systemstack;
pub use syscall::blocking;
pub use teardown::RuntimeDropped;
pub use time::{after, sleep};
pub use tls::getg;
