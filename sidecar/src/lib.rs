//! wip
pub mod config;
pub mod discovery;
pub mod error;
pub mod readiness;
