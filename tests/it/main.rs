//! Integration tests: every test starts real homeservers on loopback (see
//! `parley_tests::TestServer`): in-process by default, `parleyd` processes where a test kills
//! one, measures its memory or needs its own umask. All compile into this one binary.

mod bad_input;
mod cli;
mod cluster;
mod delivery;
mod devnet;
mod discovery;
mod e2ee;
mod federation;
mod federation_faults;
mod federation_security;
mod file_messages;
mod files;
mod group_messenger;
mod groups;
mod hostile_clients;
mod keypackages;
mod keys;
mod media;
mod media_s3;
mod ops;
mod overload;
mod postgres_migrate;
mod postgres_schema;
mod presence;
mod push;
mod raw;
mod receipts;
mod support;
mod tidy;
