//! Rust-facing wrappers over the switch code (Go's `stubs.go`):
//! [`systemstack`] for closures, and [`OnceFrame`], the on-stack
//! [`FuncVal`] that carries a closure through the asm.

use core::mem::ManuallyDrop;

use crate::asm_amd64;
use crate::runtime2::FuncVal;
use crate::tls::getg;

/// A closure and its result slot, laid out behind a [`FuncVal`] so the
/// asm can call it with `(fv.fn_)(fv)`.
#[repr(C)]
pub(crate) struct OnceFrame<F, R> {
    fv: FuncVal,
    f: ManuallyDrop<F>,
    r: Option<R>,
}

impl<F: FnOnce() -> R, R> OnceFrame<F, R> {
    pub(crate) fn new(f: F) -> Self {
        OnceFrame {
            fv: FuncVal {
                fn_: Self::call_once,
            },
            f: ManuallyDrop::new(f),
            r: None,
        }
    }

    /// The `FuncVal` to hand to the asm. The frame must stay in place
    /// until the call is over.
    pub(crate) fn funcval(&mut self) -> *mut FuncVal {
        &raw mut self.fv
    }

    /// The result, if the closure ran to completion.
    pub(crate) fn take_result(&mut self) -> Option<R> {
        self.r.take()
    }

    /// # Safety
    ///
    /// `fv` must be the `fv` field of a live `OnceFrame<F, R>` whose
    /// closure has not been called yet.
    unsafe extern "C" fn call_once(fv: *mut FuncVal) {
        let frame = fv.cast::<Self>();
        // SAFETY: fv is the first field of a #[repr(C)] OnceFrame (the
        // contract), so the cast recovers the frame; the closure is taken
        // exactly once because each frame is called once.
        unsafe {
            let f = ManuallyDrop::take(&mut (*frame).f);
            (*frame).r = Some(f());
        }
    }
}

/// Runs `f` on the current M's system stack (g0's) and returns its result
/// (Go's `systemstack`).
///
/// From a user G, `f` runs on g0's stack and the G's stack is left as it
/// is; on g0 (including inside another `systemstack`), `f` is called
/// directly. Code that must not grow a G's stack, or that must run on the
/// M rather than on a G, uses it. A backtrace taken inside `f` shows the
/// G's frames below `systemstack`.
///
/// `f` must not switch goroutines, block or panic: a channel, `sync` or
/// `join` wait in `f` is a fatal error (`blocking on the system stack`),
/// and so is a panic (unwinding cannot cross the switch; with `std` it is
/// caught on g0 and reported as `panic on the system stack: <message>`,
/// naming the goroutine; without `std` it goes to the panic handler).
///
/// # Panics
///
/// If the calling thread is not a gokernel M.
///
/// ```
/// # use gokernel::{proc::mstart, runtime2::M};
/// let mut m = M::new(1);
/// // SAFETY: this thread runs no other M, and `m` outlives the call.
/// unsafe {
///     mstart(&mut *m, || {
///         let x = gokernel::systemstack(|| 6 * 7);
///         assert_eq!(x, 42);
///     });
/// }
/// ```
#[track_caller]
pub fn systemstack<R>(f: impl FnOnce() -> R) -> R {
    assert!(
        !getg().is_null(),
        "gokernel::systemstack called on a thread that is not a gokernel M"
    );
    // A panic cannot unwind across the switch to g0 and back (the unwinder
    // stops there: "failed to initiate panic"): catch it on g0 and make it
    // a named fatal error.
    #[cfg(feature = "std")]
    let f = move || match std::panic::catch_unwind(core::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| {
                    p.downcast_ref::<alloc::string::String>()
                        .map(|s| s.as_str())
                })
                .unwrap_or("(a payload that is not a string)");
            crate::panic::throw_on_system_stack(&alloc::format!("panic on the system stack: {msg}"))
        }
    };
    let mut frame = OnceFrame::new(f);
    // SAFETY: the frame lives on this stack until systemstack returns; the
    // current G belongs to this thread's M (checked non-null above, and
    // the asm checks it is g0, gsignal or m.curg).
    unsafe { asm_amd64::systemstack(frame.funcval()) };
    frame
        .take_result()
        .expect("systemstack returned without running its function")
}
