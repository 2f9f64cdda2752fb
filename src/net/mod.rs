//! Peers over the network: mutual TLS with pinned peer ids ([`tls`]), the framed
//! protocol spoken over it ([`protocol`]), and a connection that carries requests
//! both ways ([`conn`]); a peer's folder as the sync engine reads it through
//! such connections ([`remote`]).

pub mod conn;
pub mod protocol;
pub mod remote;
pub mod tls;
