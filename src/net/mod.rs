//! Peers over the network: mutual TLS with pinned peer ids ([`tls`]), the framed
//! protocol spoken over it ([`protocol`]), and a connection that carries requests
//! both ways ([`conn`]); a peer's folder as the sync engine reads it through
//! such connections ([`remote`]), which asks each chunk of the peer expected to
//! answer first ([`pace`]).

pub mod conn;
pub mod pace;
pub mod protocol;
pub mod remote;
pub mod tls;
