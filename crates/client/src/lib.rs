//! Rust client for dflockd (work in progress).
#![warn(missing_docs)]

mod error;

pub use error::{Error, Result};
