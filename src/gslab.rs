//! Where a scheduler's Gs live: `allgs`, the list of every G it made, and
//! the slabs of memory those Gs are carved from.
//!
//! Go allocates a G on its garbage-collected heap and never frees it
//! (dead Gs wait on `sched.gFree` for reuse). gokernel keeps dead Gs for
//! reuse too, and gives back those that sit unused (`gftrim`,
//! `Runtime::free_dead_goroutines`); a G it allocates comes from a *slab*
//! of its scheduler, not from the global allocator:
//!
//! - a slab is one allocation holding many Gs, each slab twice the size
//!   of the last, from [`SLAB_FIRST`] (16 KiB, 49 Gs) up to [`SLAB_MAX`]
//!   (64 KiB, 199 Gs). Hosted it is an anonymous `mmap` with
//!   `MAP_POPULATE`, so its pages come in with one system call, where a
//!   burst of `Box`ed Gs grew glibc's per-thread malloc arena a page at a
//!   time (an `mprotect` and a page fault every 12 Gs: 8 % of the time of
//!   spawning 1,000 parked goroutines, measured). Freestanding it is one
//!   allocation from the global allocator;
//! - a new G takes the next free place of the newest slab; a freed one
//!   goes on the slabs' free list (linked through its first word), which
//!   the next new G takes first. A G costs its size (`SIZEOF_G` in
//!   `docs/offsets.md`) and no allocator header;
//! - slabs go back only when the scheduler is dropped (after
//!   `Sched::drop` has dropped every G in `allgs`): freeing dead Gs gives
//!   their stacks back to the system and their places to the next Gs.
//!
//! Every G in a slab is either listed in `allgs` (live: its memory holds
//! a G) or on the free list (its memory holds only the link); `allgs` and
//! the slabs are under one lock ([`Sched::allgs`](crate::runtime2::Sched)),
//! which a spawn takes anyway to list a new G. A new slab is mapped
//! without that lock held.
//!
//! The g0 of an M (`M::new`) and a G made by [`malg`](crate::proc::malg)
//! are `Box`es: they belong to no scheduler's list.

use core::alloc::Layout;
use core::ptr::null_mut;

use crate::runtime2::G;

/// Bytes of a scheduler's first slab of Gs.
pub(crate) const SLAB_FIRST: usize = 16 << 10;

/// Bytes of a slab of Gs at most: each is twice the last until this.
/// Hosted, a slab's pages are all brought in when it is mapped, so a
/// larger last slab holds more pages no G uses yet: with slabs of up to
/// 1 MiB, spawning 1,000 parked goroutines took 1.02–1.03 times as long
/// as with 64 KiB (801 interleaved rounds, twice), 100,000 alive 1.01.
pub(crate) const SLAB_MAX: usize = 64 << 10;

/// Every G of a scheduler, and the slabs they live in (see the [module
/// docs](self)). Read as a slice of the live Gs.
pub(crate) struct AllGs {
    /// The live Gs; `G::allg_index` is each one's place here.
    list: alloc::vec::Vec<*mut G>,
    /// Places of freed Gs, each holding the address of the next (null
    /// ends the list).
    free: *mut u8,
    /// The unused part `[next, end)` of the newest slab.
    next: usize,
    end: usize,
    /// Every slab, `(base, bytes)`, freed when this is dropped.
    slabs: alloc::vec::Vec<(usize, usize)>,
}

// SAFETY: the raw pointers are to memory this AllGs owns (its slabs) and
// to the Gs in it, which the scheduler shares between threads under the
// lock that holds this; nothing in it is tied to a thread.
unsafe impl Send for AllGs {}

impl AllGs {
    /// No Gs and no slab yet.
    pub(crate) const fn new() -> Self {
        AllGs {
            list: alloc::vec::Vec::new(),
            free: null_mut(),
            next: 0,
            end: 0,
            slabs: alloc::vec::Vec::new(),
        }
    }

    /// A place for a G: a freed one, or the next of the newest slab; null
    /// when there is none without a new slab.
    fn take(&mut self) -> *mut G {
        if !self.free.is_null() {
            let p = self.free;
            // SAFETY: a place on the free list holds the next one's
            // address in its first word (put there by `release`).
            self.free = unsafe { p.cast::<*mut u8>().read() };
            return p.cast();
        }
        if self.end - self.next >= size_of::<G>() {
            let p = self.next;
            self.next += size_of::<G>();
            return p as *mut G;
        }
        null_mut()
    }

    /// Makes `[base, base + bytes)` the newest slab; what was left of the
    /// last one goes on the free list.
    fn add_slab(&mut self, base: usize, bytes: usize) {
        while self.end - self.next >= size_of::<G>() {
            let p = self.next as *mut u8;
            // SAFETY: an unused place of a slab of ours, aligned for a G
            // (so for a pointer).
            unsafe { p.cast::<*mut u8>().write(self.free) };
            self.free = p;
            self.next += size_of::<G>();
        }
        self.slabs.push((base, bytes));
        self.next = base;
        self.end = base + bytes;
    }

    /// Bytes of the next slab: twice the last, from [`SLAB_FIRST`] up to
    /// [`SLAB_MAX`].
    fn next_slab_bytes(&self) -> usize {
        self.slabs
            .last()
            .map_or(SLAB_FIRST, |&(_, b)| (2 * b).min(SLAB_MAX))
    }

    /// Moves `g` into a place at `gp`, lists it, and returns it, its
    /// `sched.g` and `allg_index` set.
    ///
    /// # Safety
    ///
    /// `gp` is a place from [`take`](Self::take).
    unsafe fn put(&mut self, gp: *mut G, g: G) -> *mut G {
        // SAFETY: the contract: the place is ours, unused, and aligned
        // and large enough for a G.
        unsafe {
            gp.write(g);
            (*gp).sched.g = gp;
            (*gp).allg_index = self.list.len();
        }
        self.list.push(gp);
        gp
    }

    /// Takes dead Gs off the list (the last G listed takes each one's
    /// index); [`free`](Self::free) then drops them.
    ///
    /// # Safety
    ///
    /// Each G is listed here, dead, and on no queue or free list.
    pub(crate) unsafe fn unlist(&mut self, gs: &[*mut G]) {
        for &g in gs {
            // SAFETY: the contract: g is listed, so allg_index is its
            // place; every G listed is live.
            unsafe {
                let i = (*g).allg_index;
                debug_assert!(self.list[i] == g, "allgs index out of date");
                self.list.swap_remove(i);
                if let Some(&moved) = self.list.get(i) {
                    (*moved).allg_index = i;
                }
            }
        }
    }

    /// Drops Gs taken off the list by [`unlist`](Self::unlist) and gives
    /// their places to the next new ones.
    ///
    /// # Safety
    ///
    /// Each G was made here and unlisted, is not freed yet, and nothing
    /// refers to it any more.
    pub(crate) unsafe fn free(&mut self, gs: &[*mut G]) {
        for &g in gs {
            // SAFETY: the contract: g is ours to drop; its place, aligned
            // for a G, then holds only the free list's link.
            unsafe {
                g.drop_in_place();
                g.cast::<*mut u8>().write(self.free);
            }
            self.free = g.cast();
        }
    }
}

impl core::ops::Deref for AllGs {
    type Target = [*mut G];

    fn deref(&self) -> &[*mut G] {
        &self.list
    }
}

impl Drop for AllGs {
    /// Frees the slabs. The Gs still listed are not dropped here (the
    /// scheduler's drop does that first); any it did not drop are leaked,
    /// with whatever they own.
    fn drop(&mut self) {
        for &(base, bytes) in &self.slabs {
            // SAFETY: a slab made by slab_alloc(bytes), freed once; the Gs
            // in it have been dropped, or are leaked (their drop never
            // runs), so nothing refers to it.
            unsafe { slab_free(base as *mut u8, bytes) };
        }
    }
}

/// A new G holding `g`, listed in `allgs` (Go's `allgadd`): from a freed
/// place or the newest slab, or from a new slab, mapped without the lock
/// held. Aborts, as `Box::new` does, if there is no memory for a slab.
pub(crate) fn galloc(allgs: &spin::Mutex<AllGs>, g: G) -> *mut G {
    let bytes = {
        let mut all = allgs.lock();
        let gp = all.take();
        if !gp.is_null() {
            // SAFETY: gp is a place from take.
            return unsafe { all.put(gp, g) };
        }
        all.next_slab_bytes()
    };
    let base = slab_alloc(bytes);
    let mut all = allgs.lock();
    // Another thread may have added a slab meanwhile: this one is the
    // newest either way, and what is left of the other is on the free
    // list.
    all.add_slab(base as usize, bytes);
    let gp = all.take();
    debug_assert!(!gp.is_null(), "a new slab holds a G");
    // SAFETY: gp is a place from take.
    unsafe { all.put(gp, g) }
}

/// The layout of a slab of `bytes`: page-aligned, so every place in it is
/// aligned for a G.
fn slab_layout(bytes: usize) -> Layout {
    const { assert!(crate::stack::PAGE_SIZE.is_multiple_of(align_of::<G>())) };
    Layout::from_size_align(bytes, crate::stack::PAGE_SIZE).expect("slab layout")
}

/// A slab of `bytes` (hosted: its pages brought in now; freestanding: from
/// the global allocator). Never null: no memory aborts.
fn slab_alloc(bytes: usize) -> *mut u8 {
    #[cfg(feature = "std")]
    // SAFETY: a new anonymous private mapping at an address the kernel
    // picks touches no existing memory. MAP_POPULATE brings every page in
    // (writable, zeroed) in this one call.
    let p = unsafe {
        let p = libc::mmap(
            null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            null_mut()
        } else {
            p.cast::<u8>()
        }
    };
    #[cfg(not(feature = "std"))]
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { alloc::alloc::alloc(slab_layout(bytes)) };
    if p.is_null() {
        alloc::alloc::handle_alloc_error(slab_layout(bytes));
    }
    p
}

/// Frees a slab.
///
/// # Safety
///
/// `p` is from `slab_alloc(bytes)`, not freed yet, and nothing refers to
/// its memory.
unsafe fn slab_free(p: *mut u8, bytes: usize) {
    #[cfg(feature = "std")]
    {
        // SAFETY: the contract: the mapping is ours and unused.
        let rc = unsafe { libc::munmap(p.cast(), bytes) };
        debug_assert_eq!(rc, 0, "munmap of a slab of Gs failed");
    }
    #[cfg(not(feature = "std"))]
    // SAFETY: the contract: allocated by slab_alloc with this layout.
    unsafe {
        alloc::alloc::dealloc(p, slab_layout(bytes))
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime2::Stack;

    fn new_g(all: &spin::Mutex<AllGs>) -> *mut G {
        galloc(all, crate::proc::newg_struct(Stack { lo: 0, hi: 0 }, None))
    }

    #[test]
    fn slabs_double_and_freed_places_are_taken_before_a_new_slab() {
        let all = spin::Mutex::new(AllGs::new());
        let per_first = SLAB_FIRST / size_of::<G>();
        // The first slab, the second (twice as large) and one G of the third.
        let n = per_first + 2 * SLAB_FIRST / size_of::<G>() + 1;
        let gs: alloc::vec::Vec<*mut G> = (0..n).map(|_| new_g(&all)).collect();
        {
            let a = all.lock();
            let sizes: alloc::vec::Vec<usize> = a.slabs.iter().map(|&(_, b)| b).collect();
            assert_eq!(sizes, [SLAB_FIRST, 2 * SLAB_FIRST, 4 * SLAB_FIRST]);
            for (i, &g) in gs.iter().enumerate() {
                assert_eq!(a[i], g);
                // SAFETY: g is live (listed).
                unsafe {
                    assert_eq!((*g).allg_index, i);
                    assert_eq!((*g).sched.g, g);
                }
                let inside = a
                    .slabs
                    .iter()
                    .any(|&(base, b)| (base..base + b).contains(&(g as usize)));
                assert!(inside, "G {i} is in no slab");
                assert!((g as usize).is_multiple_of(align_of::<G>()));
            }
        }
        // Free every third G: the rest stay listed at consistent indexes.
        let freed: alloc::vec::Vec<*mut G> = gs.iter().copied().step_by(3).collect();
        {
            let mut a = all.lock();
            // SAFETY: the Gs are listed, idle and referred to by nobody.
            unsafe {
                a.unlist(&freed);
                a.free(&freed);
            }
            assert_eq!(a.len(), n - freed.len());
            for (i, &g) in a.iter().enumerate() {
                // SAFETY: g is listed, so live.
                assert_eq!(unsafe { (*g).allg_index }, i);
            }
        }
        // New Gs take exactly the freed places, and no new slab.
        let mut again: alloc::vec::Vec<*mut G> = freed.iter().map(|_| new_g(&all)).collect();
        let mut want = freed.clone();
        again.sort_unstable();
        want.sort_unstable();
        assert_eq!(again, want);
        let mut a = all.lock();
        assert_eq!(a.slabs.len(), 3);
        let everyone: alloc::vec::Vec<*mut G> = a.iter().copied().collect();
        // SAFETY: as above.
        unsafe {
            a.unlist(&everyone);
            a.free(&everyone);
        }
        assert!(a.is_empty());
    }

    #[test]
    fn slabs_stop_growing_at_the_largest_size() {
        let mut a = AllGs::new();
        let mut bytes = alloc::vec::Vec::new();
        for _ in 0..10 {
            let b = a.next_slab_bytes();
            bytes.push(b);
            a.slabs.push((0, b));
        }
        assert_eq!(bytes[0], SLAB_FIRST);
        assert_eq!(*bytes.last().unwrap(), SLAB_MAX);
        assert!(bytes.windows(2).all(|w| w[1] == (2 * w[0]).min(SLAB_MAX)));
        // Nothing was mapped: forget the made-up slabs.
        a.slabs.clear();
    }
}
