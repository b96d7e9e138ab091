//! The image's run: the checks only a freestanding image can make (TLS
//! template, FS base, per-M slots, shutdown) around the scheduler
//! scenarios it shares with the reference kernel (`scenarios.rs`), on 2
//! Ms made by clone(2).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use gokernel::runtime2::Sched;
use gokernel::tls::{FsBaseMode, fs0};

use crate::platform::{IMAGE, M_RECORDS, NRECORDS};
use crate::scenarios::{self, Host, Report};
use crate::{Boot, say, sys};

/// The PT_TLS program header, read through AT_PHDR / AT_PHNUM.
fn pt_tls(boot: &Boot) -> Option<(usize, usize, usize, usize)> {
    const PT_TLS: u32 = 7;
    const PHDR_SIZE: usize = 56;
    (0..boot.phnum).find_map(|i| {
        let ph = boot.phdr + i * PHDR_SIZE;
        // SAFETY: the kernel maps the program headers at AT_PHDR, AT_PHNUM
        // entries of 56 bytes (Elf64_Phdr).
        unsafe {
            let p_type = *(ph as *const u32);
            (p_type == PT_TLS).then(|| {
                let vaddr = *((ph + 16) as *const usize);
                let filesz = *((ph + 32) as *const usize);
                let memsz = *((ph + 40) as *const usize);
                let align = *((ph + 48) as *const usize);
                (vaddr, filesz, memsz, align)
            })
        }
    })
}

pub fn run(boot: &Boot, mode: FsBaseMode, tp: usize) -> bool {
    let mut r = Report::new();
    say!(
        "gokernel freestanding image: FS base by {mode:?}, AT_HWCAP2 = {:#x}",
        boot.hwcap2
    );

    let t = crate::tls_template();
    let ph = pt_tls(boot);
    r.check(
        "tls-template",
        ph == Some((t.tdata as usize, t.filesz, t.memsz, t.align)),
        format_args!(
            "linker symbols ({:#x}, filesz {}, memsz {}, align {}) vs PT_TLS {ph:x?}",
            t.tdata as usize, t.filesz, t.memsz, t.align
        ),
    );

    let base = sys::arch_get_fs();
    let via_insn = if mode == FsBaseMode::Wrfsbase {
        // SAFETY: wrfsbase mode was allowed by AT_HWCAP2, so rdfsbase is too.
        Some(unsafe { gokernel::tls::rdfsbase() })
    } else {
        None
    };
    r.check(
        "fs0-is-fs-base",
        fs0() == tp && base == tp && via_insn.is_none_or(|v| v == tp),
        format_args!(
            "fs:0 = {:#x}, FS base = {base:#x}, rdfsbase = {via_insn:x?}, tp = {tp:#x}",
            fs0()
        ),
    );

    let sched: &'static Sched =
        Box::leak(Box::new(Sched::new(2, gokernel::stack::STACK_MIN, &IMAGE)));

    scenarios::run_all(
        Host {
            sched,
            platform: &IMAGE,
        },
        &mut r,
        100,
    );

    let n = NRECORDS.load(Ordering::Acquire).min(M_RECORDS.len());
    let recs: Vec<_> = M_RECORDS[..n]
        .iter()
        .map(|m| {
            (
                m.tp.load(Ordering::Relaxed),
                m.fs0.load(Ordering::Relaxed),
                m.fs_base.load(Ordering::Relaxed),
                m.slot.load(Ordering::Relaxed),
            )
        })
        .collect();
    let consistent = recs.iter().all(|&(tp, f0, fb, _)| tp == f0 && tp == fb);
    let mut slots: Vec<usize> = recs.iter().map(|r| r.3).collect();
    slots.sort_unstable();
    slots.dedup();
    r.check(
        "tls-per-m",
        n >= 3 && consistent && slots.len() == n,
        format_args!(
            "{n} threads (M0 + {} Ms): fs:0 == FS base on each: {consistent}; distinct G slots: {}",
            n - 1,
            slots.len()
        ),
    );

    sched.shutdown();
    r.check(
        "shutdown",
        sched.ngoroutines() == 0,
        format_args!("Ms stopped; goroutines left: {}", sched.ngoroutines()),
    );

    for p in &sched.pstats() {
        say!(
            "  P{}: spawned {}, stolen {}, parked {}, scheduled {}, run-queue high-water {}",
            p.id,
            p.spawned,
            p.stolen,
            p.parked,
            p.scheduled,
            p.runq_hwm
        );
    }
    say!("image: {} passed, {} failed", r.passed, r.failed);
    r.failed != 0
}
