//! Version 1 of the federation API.

pub mod claim;
pub mod groups;
pub mod keys;
pub mod media;
pub mod transaction;
