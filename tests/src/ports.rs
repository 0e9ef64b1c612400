//! Loopback ports for the processes a test starts, without the bind-drop-hand-over race.
//!
//! A port found by binding port 0 and dropping the socket can be taken before the child
//! binds it: by an outgoing connection (ephemeral ports come from the same range) or by
//! another test process doing the same. [`reserve`] picks ports **below** the kernel's
//! ephemeral range, where no outgoing connection lands, and claims each with a lock
//! file naming this process (`$TMPDIR/maeum-e2e-ports/PORT`), so two test processes
//! never pick the same one; a claim whose process is gone is taken over.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// The lowest port handed out.
const FIRST: u16 = 10_000;

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_low() -> Option<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Claims `lock` for this process: created anew, or taken over from a process that
/// is gone.
fn claim(lock: &std::path::Path) -> bool {
    for _ in 0..2 {
        match std::fs::OpenOptions::new().write(true).create_new(true).open(lock) {
            Ok(mut f) => return write!(f, "{}", std::process::id()).is_ok(),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(lock).ok().and_then(|s| s.trim().parse::<u32>().ok());
                if owner.is_some_and(alive) {
                    return false;
                }
                // A claim left by a test process that died (or one half written): take it over.
                let _ = std::fs::remove_file(lock);
            }
            Err(_) => return false,
        }
    }
    false
}

/// A free loopback address (`127.0.0.1:PORT`) that no other test process and no
/// outgoing connection will take; held for the life of this process.
pub fn reserve() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let last = ephemeral_low().unwrap_or(32_768).saturating_sub(1);
    let dir = std::env::temp_dir().join("maeum-e2e-ports");
    if last > FIRST + 100 && std::fs::create_dir_all(&dir).is_ok() {
        let span = u64::from(last - FIRST);
        let start = u64::from(std::process::id()) * 7_919 + NEXT.fetch_add(1, Ordering::Relaxed) * 104_729;
        for i in 0..span {
            let port = FIRST + u16::try_from((start + i) % span).unwrap_or(0);
            if claim(&dir.join(port.to_string())) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return format!("127.0.0.1:{port}");
            }
        }
    }
    // No room below the ephemeral range: the old way, racy but rare.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let addrs: Vec<String> = (0..20).map(|_| reserve()).collect();
        let mut unique = addrs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), addrs.len(), "{addrs:?}");
        for a in &addrs {
            let port: u16 = a.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
            if let Some(low) = ephemeral_low().filter(|&l| l > FIRST + 100) {
                assert!(port >= FIRST && port < low, "{a}");
            }
            std::net::TcpListener::bind(a.as_str()).expect("bindable");
        }
    }
}
