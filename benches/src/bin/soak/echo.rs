//! `soak echo <addr>`: the backends' echo server, this binary started in
//! a backend host. Every byte comes back until the peer closes; a peer gone
//! silent is let go after a minute.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The most connections the echo server serves at once.
const ECHO_MAX_CONNS: usize = 2000;

/// `soak echo <addr>`: echoes every byte back until the peer closes.
pub(crate) fn echo_main(addr: &str) -> ExitCode {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("soak echo: bind {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let live = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        match stream {
            Ok(stream) if live.load(Ordering::Relaxed) < ECHO_MAX_CONNS => {
                live.fetch_add(1, Ordering::Relaxed);
                let live = Arc::clone(&live);
                std::thread::spawn(move || {
                    if let Err(e) = echo(stream) {
                        // Resets are what a failover does to a stream.
                        if !matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                        ) {
                            eprintln!("soak echo: {e}");
                        }
                    }
                    live.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Ok(stream) => drop(stream),
            Err(e) => {
                eprintln!("soak echo: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    ExitCode::SUCCESS
}

pub(crate) fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    // A peer gone silent (its balancer died) is let go.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}
