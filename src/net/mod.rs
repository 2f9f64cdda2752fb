//! Peers over the network: mutual TLS with pinned peer ids ([`tls`]), the framed
//! protocol spoken over it ([`protocol`]), and a connection that carries requests
//! both ways ([`conn`]).

pub mod conn;
pub mod protocol;
pub mod tls;
