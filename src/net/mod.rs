//! Peers over the network: mutual TLS with pinned peer ids ([`tls`]), the framed
//! protocol spoken over it ([`protocol`]).

pub mod protocol;
pub mod tls;
