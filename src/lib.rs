//! Latus: peer-to-peer folder synchronisation.
//!
//! Modules follow the data flow of `DESIGN.md`:
//! disk → [`scan`] → [`history`] (SQLite) → … (diff, chunks, merge, net come later).
//! [`content`] cuts and hashes file content, [`folder`] owns a synced root and its
//! `.latus/` directory, [`device`] owns the per-device state (`$LATUS_HOME`).

pub mod content;
pub mod device;
pub mod diff;
pub mod error;
pub mod folder;
pub mod history;
pub mod scan;
pub mod throttle;

pub use error::{Error, Result};
