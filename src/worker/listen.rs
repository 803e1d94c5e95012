//! Binding `pg_realtime.listen_addresses` the way Postgres reads
//! `listen_addresses`: a comma-separated list of host names or addresses,
//! `*` for every address, empty for none. Failures are reported per address.

use pgrx::prelude::*;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

/// Binds every address it can; reports each failure and each success.
pub fn bind(addresses: &str, port: u16) -> Vec<TcpListener> {
    let mut listeners: Vec<TcpListener> = Vec::new();
    for entry in addresses.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let candidates: Vec<SocketAddr> = if entry == "*" {
            // IPv6 first: on a dual-stack host `::` also takes IPv4, and the
            // IPv4 bind that follows then fails harmlessly.
            vec![SocketAddr::from(([0u16; 8], port)), SocketAddr::from(([0u8; 4], port))]
        } else {
            match (entry, port).to_socket_addrs() {
                Ok(addrs) => addrs.collect(),
                Err(e) => {
                    warning!("pg_realtime: could not resolve \"{entry}\" in pg_realtime.listen_addresses: {e}");
                    continue;
                }
            }
        };
        for addr in candidates {
            if listeners.iter().any(|l| l.local_addr().ok() == Some(addr)) {
                continue;
            }
            match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(listener) => {
                    log!("pg_realtime: listening for WebSocket connections on {addr}");
                    listeners.push(listener);
                }
                Err(e) if entry == "*" && !listeners.is_empty() => {
                    debug1!("pg_realtime: {addr} not bound separately: {e}");
                }
                Err(e) => warning!("pg_realtime: could not listen on {addr}: {e}"),
            }
        }
    }
    listeners
}
