//! Latus: peer-to-peer folder synchronisation.
//!
//! Modules follow the data flow of `DESIGN.md`:
//! disk → [`scan`] → [`history`] (SQLite) → history exchange with a [`peer`] →
//! [`diff`] (decide and plan) → [`merge`] (apply, old versions to the [`trash`]).
//! [`sync`] runs that loop between two local folders (`latus sync A B`);
//! [`device_sync`] syncs a folder with a dumb device (`latus sync --device`).
//! [`content`] cuts and hashes file content, [`folder`] owns a synced root and its
//! `.latus/` directory, [`device`] owns the per-device state (`$LATUS_HOME`) and
//! [`identity`] its certificate, whose hash is its peer id. A daemon's builds
//! record the chunks they fetch in the [`chunk_store`], to resume after a crash.

pub mod chunk_store;
pub mod content;
pub mod daemon;
pub mod device;
pub mod device_sync;
pub mod diff;
pub mod error;
pub mod folder;
pub mod history;
pub mod identity;
pub mod merge;
pub mod net;
pub mod peer;
pub mod scan;
pub mod shares;
pub mod sync;
pub mod throttle;
pub mod trash;
pub mod xmpp;

pub use error::{Error, Result};

/// The wall clock in Unix nanoseconds (author and record times).
pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}
