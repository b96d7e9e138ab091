//! The serial console: COM1 (I/O port 0x3f8), 115200 8N1, polled. QEMU's
//! `-serial stdio` shows it on the terminal.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::x86::{inb, irq_restore, irq_save, outb};

const COM1: u16 = 0x3f8;

/// Whole lines from different CPUs do not interleave: a writer holds this
/// (with interrupts off, so a handler that prints cannot deadlock on its
/// own CPU).
static LOCK: AtomicBool = AtomicBool::new(false);

/// Sets COM1 up: no interrupts, 115200 baud (divisor 1), 8N1, FIFOs on.
pub fn init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
}

fn put(b: u8) {
    while inb(COM1 + 5) & 0x20 == 0 {
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// Writes `bytes` as one piece ("\n" becomes "\r\n").
pub fn write(bytes: &[u8]) {
    let on = irq_save();
    // A bounded wait: a fatal message from a CPU that interrupted the
    // holder on another CPU still gets out after about a second.
    let mut tries = 0u32;
    while LOCK.swap(true, Ordering::Acquire) && tries < 50_000_000 {
        core::hint::spin_loop();
        tries += 1;
    }
    for &b in bytes {
        if b == b'\n' {
            put(b'\r');
        }
        put(b);
    }
    LOCK.store(false, Ordering::Release);
    irq_restore(on);
}
