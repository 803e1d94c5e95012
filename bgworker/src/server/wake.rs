//! The wake-up from network threads to the worker's main thread. Network
//! threads must not call `SetLatch` (or anything else of Postgres), so the
//! main loop waits on its latch *and* on the read end of a socket pair that
//! network threads write a byte to.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// The writing half, cloned into every network thread that needs the main
/// thread's attention.
#[derive(Clone, Debug)]
pub struct Waker(Arc<UnixStream>);

/// The reading half, owned by the main thread.
#[derive(Debug)]
pub struct WakeReceiver(UnixStream);

/// A connected pair; both ends non-blocking.
pub fn wake_pair() -> std::io::Result<(Waker, WakeReceiver)> {
    let (tx, rx) = UnixStream::pair()?;
    tx.set_nonblocking(true)?;
    rx.set_nonblocking(true)?;
    Ok((Waker(Arc::new(tx)), WakeReceiver(rx)))
}

impl Waker {
    /// Makes the read end readable. Never blocks: if the buffer is full the
    /// main thread has plenty of wake-ups pending already.
    pub fn wake(&self) {
        let _ = (&*self.0).write(&[1]);
    }
}

impl WakeReceiver {
    /// The descriptor to wait on (`WL_SOCKET_READABLE`).
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Consumes every pending wake-up; returns how many bytes there were.
    pub fn drain(&mut self) -> usize {
        let mut buf = [0u8; 256];
        let mut total = 0;
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return total,
                Ok(n) => total += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return total,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_then_drain() {
        let (waker, mut rx) = wake_pair().unwrap();
        assert_eq!(rx.drain(), 0);
        let w2 = waker.clone();
        std::thread::spawn(move || w2.wake()).join().unwrap();
        waker.wake();
        assert_eq!(rx.drain(), 2);
        assert_eq!(rx.drain(), 0);
    }

    #[test]
    fn wake_never_blocks_when_full() {
        let (waker, mut rx) = wake_pair().unwrap();
        for _ in 0..1_000_000 {
            waker.wake();
        }
        assert!(rx.drain() > 0);
    }
}
