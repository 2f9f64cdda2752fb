//! Peers over the network: mutual TLS with pinned peer ids ([`tls`]).

pub mod tls;
