//! The freestanding gokernel image: no libc, no std, its own `_start`,
//! linked with `linker/x86_64.ld`, run as a plain Linux process.
//!
//! It builds a TLS block for its first thread (and one for every M), sets
//! the FS base with `wrfsbase` or `arch_prctl` (`--fs=wrfsbase|fallback`,
//! default: what `AT_HWCAP2` allows), starts a 2-P scheduler whose Ms are
//! `clone(2)` threads, and runs the scheduler scenarios of the hosted
//! suite. With `--cpus` the platform starts no threads: two threads the
//! image starts join the scheduler as its CPUs (`gokernel::cpu::join`),
//! signals stand in for interrupts (`gokernel::intr`), and the CPU-mode
//! checks run too (see `cpus.rs`). It prints one line per check and a summary, and exits 0 only if
//! every check passed (1 otherwise, 2 for bad arguments).
#![no_std]
#![no_main]

extern crate alloc;

mod checks;
mod cpus;
mod heap;
#[cfg(not(target_os = "none"))]
mod mem;
mod platform;
mod poll;
mod scenarios;
mod sys;

use core::arch::naked_asm;
use core::fmt::Write;

use gokernel::tls::{FsBaseMode, TlsBlock, TlsTemplate, fs_base_mode_for};

#[global_allocator]
static ALLOC: heap::Alloc = heap::Alloc::new();

unsafe extern "C" {
    // Absolute symbols from linker/x86_64.ld: their addresses are the values.
    static __tls_start: u8;
    static __tls_filesz: u8;
    static __tls_memsz: u8;
    static __tls_align: u8;
}

/// The TLS template, from the linker script's symbols.
pub fn tls_template() -> TlsTemplate {
    TlsTemplate {
        tdata: &raw const __tls_start,
        filesz: &raw const __tls_filesz as usize,
        memsz: &raw const __tls_memsz as usize,
        align: &raw const __tls_align as usize,
    }
}

/// A line of output, formatted without allocating.
pub struct Out(pub heapless::String<256>);

/// Prints to stdout.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {{
        let mut o = $crate::Out(heapless::String::new());
        let _ = core::fmt::Write::write_fmt(&mut o.0, format_args!($($t)*));
        let _ = o.0.push('\n');
        $crate::sys::write_all(1, o.0.as_bytes());
    }};
}

/// The entry point: the kernel leaves argc, argv, envp and the auxiliary
/// vector on the stack.
///
/// Register contract:
/// - in: rsp = the initial process stack (argc at [rsp]), other registers
///   unspecified;
/// - out: never returns (`image_main` exits the process);
/// - clobbered: rbp (zeroed: the end of the frame chain), rdi;
/// - stack: aligned down to 16 bytes before calling `image_main`.
///
/// # Safety
///
/// Only the kernel enters it, once.
#[unsafe(naked)]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub unsafe extern "C" fn _start() -> ! {
    naked_asm!(
        "xor ebp, ebp",
        "mov rdi, rsp",
        "and rsp, -16",
        "call {main}",
        "ud2",
        main = sym image_main,
    )
}

const AT_NULL: usize = 0;
const AT_PHDR: usize = 3;
const AT_PHNUM: usize = 5;
const AT_HWCAP2: usize = 26;

/// What the kernel told us at start.
pub struct Boot {
    pub hwcap2: u64,
    pub phdr: usize,
    pub phnum: usize,
}

fn fatal_write(b: &[u8]) {
    sys::write_all(2, b);
}

extern "C" fn image_main(sp: *const usize) -> ! {
    // SAFETY: the System V process stack: argc, argv[argc], NULL, envp...,
    // NULL, auxv pairs ending in AT_NULL.
    let (args, boot) = unsafe {
        let argc = *sp;
        let argv = sp.add(1) as *const *const u8;
        let mut p = argv.add(argc + 1) as *const usize;
        while *p != 0 {
            p = p.add(1);
        }
        p = p.add(1);
        let mut boot = Boot {
            hwcap2: 0,
            phdr: 0,
            phnum: 0,
        };
        while *p != AT_NULL {
            match *p {
                AT_HWCAP2 => boot.hwcap2 = *p.add(1) as u64,
                AT_PHDR => boot.phdr = *p.add(1),
                AT_PHNUM => boot.phnum = *p.add(1),
                _ => {}
            }
            p = p.add(2);
        }
        ((argc, argv), boot)
    };
    gokernel::panic::set_fatal_writer(fatal_write);

    // The FS mode: asked for on the command line, or what AT_HWCAP2 allows.
    let allowed = fs_base_mode_for(boot.hwcap2);
    let mut mode = allowed;
    let mut cpu_mode = false;
    for i in 1..args.0 {
        // SAFETY: argv[i] is a NUL-terminated string for i < argc.
        let a = unsafe { cstr(*args.1.add(i)) };
        match a {
            b"--fs=wrfsbase" => mode = FsBaseMode::Wrfsbase,
            b"--fs=fallback" => mode = FsBaseMode::Fallback,
            b"--fs=auto" => mode = allowed,
            b"--cpus" => cpu_mode = true,
            _ => {
                sys::write_all(
                    2,
                    b"usage: gokernel-image [--fs=wrfsbase|fallback|auto] [--cpus]\n",
                );
                sys::exit_group(2);
            }
        }
    }
    if mode == FsBaseMode::Wrfsbase && allowed != FsBaseMode::Wrfsbase {
        say!(
            "FAIL fs-mode: wrfsbase asked for, but AT_HWCAP2 says user-mode FSGSBASE is off (it would raise #UD)"
        );
        sys::exit_group(1);
    }
    platform::set_fs_mode(mode);
    platform::set_cpu_mode(cpu_mode);
    platform::MAIN_TID.store(sys::gettid(), core::sync::atomic::Ordering::Relaxed);

    // M0's TLS block: nothing may touch thread-locals before this.
    // SAFETY: the linker script's symbols describe this image's PT_TLS.
    let tls = unsafe { TlsBlock::new(&tls_template()) }.unwrap_or_else(|| {
        sys::write_all(2, b"out of memory for the first TLS block\n");
        sys::exit_group(1)
    });
    let tp = tls.thread_pointer();
    core::mem::forget(tls); // used until the process ends
    // SAFETY: a TLS block for this thread, alive for good; the mode was
    // checked against AT_HWCAP2 above.
    unsafe { platform::set_fs(tp) };
    platform::record_m(tp);

    let failed = checks::run(&boot, mode, tp, cpu_mode);
    sys::exit_group(i32::from(failed))
}

/// The bytes of a NUL-terminated string.
///
/// # Safety
///
/// `p` points to a NUL-terminated string that stays valid.
unsafe fn cstr(p: *const u8) -> &'static [u8] {
    let mut n = 0;
    // SAFETY: the contract: read up to the NUL.
    unsafe {
        while *p.add(n) != 0 {
            n += 1;
        }
        core::slice::from_raw_parts(p, n)
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut o = Out(heapless::String::new());
    let _ = writeln!(o.0, "gokernel-image panicked: {info}");
    sys::write_all(2, o.0.as_bytes());
    sys::exit_group(101)
}
