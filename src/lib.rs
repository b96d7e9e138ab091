//! gokernel: Go's goroutine kernel for x86_64, as a `#![no_std]` crate.
#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod asm_amd64;
pub mod panic;
pub mod proc;
pub mod runtime2;
pub mod stack;
mod stubs;
pub mod tls;

pub use stubs::systemstack;
pub use tls::getg;
