//! gokernel: Go's goroutine kernel for x86_64, as a `#![no_std]` crate.
#![no_std]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod runtime2;
pub mod stack;
