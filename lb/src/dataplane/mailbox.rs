//! A worker thread's mailbox: commands over a channel, and an eventfd whose
//! write wakes the worker's loop to read them (the io_uring and the UDP
//! workers both sleep in the kernel, not on the channel).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{mpsc, Arc};

/// The sending side; cloning shares it.
pub(crate) struct Mailbox<C> {
    commands: mpsc::Sender<C>,
    wake: Arc<OwnedFd>,
    /// What the worker is, for the logs: "an io_uring worker".
    worker: &'static str,
}

impl<C> Clone for Mailbox<C> {
    fn clone(&self) -> Self {
        Mailbox {
            commands: self.commands.clone(),
            wake: Arc::clone(&self.wake),
            worker: self.worker,
        }
    }
}

impl<C> std::fmt::Debug for Mailbox<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// The worker's side: the commands, and the eventfd to wait on (and read,
/// to rearm it).
pub(crate) struct Inbox<C> {
    pub(crate) commands: mpsc::Receiver<C>,
    pub(crate) wake: Arc<OwnedFd>,
}

/// A mailbox and its inbox; `eventfd_flags` beyond `EFD_CLOEXEC` (the UDP
/// worker reads its eventfd non-blocking).
pub(crate) fn new<C>(worker: &'static str, eventfd_flags: libc::c_int) -> io::Result<(Mailbox<C>, Inbox<C>)> {
    // SAFETY: plain eventfd(2); the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | eventfd_flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let (tx, rx) = mpsc::channel();
    Ok((
        Mailbox {
            commands: tx,
            wake: Arc::clone(&wake),
            worker,
        },
        Inbox { commands: rx, wake },
    ))
}

impl<C> Mailbox<C> {
    /// Hands `command` to the worker and wakes it.
    pub(crate) fn send(&self, command: C) {
        if self.commands.send(command).is_err() {
            tracing::error!(worker = self.worker, "a worker has stopped; command dropped");
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let n = unsafe { libc::write(self.wake.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
        if n != 8 {
            tracing::warn!(worker = self.worker, error = %io::Error::last_os_error(), "cannot wake a worker");
        }
    }
}
