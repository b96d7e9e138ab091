//! What libc would supply to the host-triple fallback build: `memcpy`,
//! `memmove`, `memset`, `memcmp`, `bcmp` and the unwinding personality
//! symbol. On the host triple `compiler_builtins` expects libc to provide
//! the memory functions, and the image links no libc
//! (`x86_64-unknown-none` gets them from `compiler_builtins`). They use
//! `rep movsb` / `rep stosb` so the compiler cannot turn them into calls to
//! themselves.

use core::arch::asm;

/// # Safety
///
/// As C's `memcpy`: `n` bytes, non-overlapping, valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the contract; rep movsb copies rcx bytes forwards.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
///
/// As C's `memmove`: `n` bytes, valid, may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forwards copy is safe when dst is below src or disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backwards copy with the direction flag, restored after.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            inout("rcx") n => _,
            options(nostack),
        );
    }
    dst
}

/// # Safety
///
/// As C's `memset`: `n` bytes, valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the contract; rep stosb stores al rcx times.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, in("al") c as u8, inout("rcx") n => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
///
/// As C's `memcmp`: `n` bytes of each, valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the contract: i < n.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
///
/// As C's `bcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract.
    unsafe { memcmp(a, b, n) }
}

/// The unwinding personality the host triple's precompiled `core` refers
/// to. The image aborts on panic, so nothing ever unwinds and this is never
/// called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
