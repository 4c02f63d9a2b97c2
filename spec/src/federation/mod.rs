//! The server-to-server (federation) API. Version 1 lives in [`v1`]; the prose is
//! `spec/federation.md` (written with the federation issue).

pub mod v1;
