//! The worker's provided buffers (`IORING_REGISTER_PBUF_RING`): the
//! kernel takes one when a read has bytes, and the worker gives it back
//! once they are sent.

#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{types, IoUring};

use super::{CHUNK, FIRST_BUFFERS, GROUP, MAX_BUFFERS};

/// The worker's provided buffers: a ring the kernel takes buffers from as
/// reads complete, and that we give them back to once sent.
pub(super) struct Pool {
    pub(super) ring: *mut types::BufRingEntry,
    pub(super) layout: std::alloc::Layout,
    /// Our copy of the ring's tail.
    pub(super) tail: u16,
    pub(super) buffers: Vec<Box<[u8]>>,
}

impl Pool {
    pub(super) fn new(ring: &IoUring) -> io::Result<Pool> {
        let layout = std::alloc::Layout::from_size_align(
            usize::from(MAX_BUFFERS) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: a non-zero, page-aligned layout; zeroed as the kernel
        // expects a fresh ring (tail 0).
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        if mem.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut pool = Pool {
            ring: mem.cast(),
            layout,
            tail: 0,
            buffers: Vec::new(),
        };
        // SAFETY: the ring memory lives until `Pool::drop`, which
        // unregisters it first (and the pool never outlives its ring: the
        // worker drops it before the ring).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(mem as u64, MAX_BUFFERS, GROUP, 0)?;
        }
        pool.grow(FIRST_BUFFERS);
        Ok(pool)
    }

    /// Adds up to `n` new buffers; false when the pool is at its bound.
    pub(super) fn grow(&mut self, n: u16) -> bool {
        let have = self.buffers.len();
        let room = usize::from(MAX_BUFFERS) - have;
        let n = usize::from(n).min(room);
        for _ in 0..n {
            self.buffers.push(vec![0u8; CHUNK].into_boxed_slice());
            let id = u16::try_from(self.buffers.len() - 1).expect("bounded by MAX_BUFFERS");
            self.put(id);
        }
        n > 0
    }

    /// Gives buffer `id` back to the kernel.
    pub(super) fn put(&mut self, id: u16) {
        let mask = MAX_BUFFERS - 1;
        let buffer = &mut self.buffers[usize::from(id)];
        // SAFETY: `tail & mask` is inside the ring; the kernel reads an
        // entry only once the tail below is published past it.
        unsafe {
            let entry = &mut *self.ring.add(usize::from(self.tail & mask));
            entry.set_addr(buffer.as_mut_ptr() as u64);
            entry.set_len(CHUNK as u32);
            entry.set_bid(id);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.ring).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    pub(super) fn bytes(&self, id: u16, len: usize) -> &[u8] {
        &self.buffers[usize::from(id)][..len]
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The registration goes with the ring, dropped before the pool
        // (see `Worker`'s field order, and `probe`).
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ring.cast(), self.layout) };
    }
}
