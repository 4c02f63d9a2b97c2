//! The dependency invariants of `ARCHITECTURE.md`, checked against the `Cargo.toml` files (as
//! rust-analyzer's tidy test does), so the document and the crates cannot drift apart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate is in the workspace root").to_path_buf()
}

/// The dependencies (normal and build; dev-dependencies are only for the crate's own tests) of
/// the workspace crate in `dir`.
fn deps(dir: &str) -> BTreeSet<String> {
    let path = workspace_root().join(dir).join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let manifest: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ["dependencies", "build-dependencies"]
        .iter()
        .filter_map(|table| manifest.get(*table).and_then(toml::Value::as_table))
        .flat_map(|table| table.keys().cloned())
        .collect()
}

/// Every workspace member, as listed in the root `Cargo.toml`.
fn members() -> Vec<String> {
    let text = std::fs::read_to_string(workspace_root().join("Cargo.toml")).expect("root Cargo.toml");
    let manifest: toml::Table = toml::from_str(&text).expect("root Cargo.toml is TOML");
    manifest["workspace"]["members"]
        .as_array()
        .expect("workspace.members")
        .iter()
        .map(|m| m.as_str().expect("member path").to_owned())
        .collect()
}

/// The crates (by directory) that depend on `dependency`.
fn dependents(dependency: &str) -> BTreeSet<String> {
    members().into_iter().filter(|member| deps(member).contains(dependency)).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn spec_and_crypto_do_no_io() {
    let io =
        ["tokio", "axum", "hyper", "reqwest", "sqlx", "rusqlite", "hickory-resolver", "tokio-tungstenite", "rustls", "tracing"];
    for krate in ["spec", "crypto"] {
        let found: Vec<&str> = io.iter().copied().filter(|d| deps(krate).contains(*d)).collect();
        assert!(found.is_empty(), "{krate}/ depends on I/O crates {found:?}");
    }
}

#[test]
fn dependencies_point_one_way() {
    // spec ← crypto ← federation ← server; spec ← crypto ← client-sdk; tests depend on all.
    let allowed: [(&str, &[&str]); 5] = [
        ("spec", &[]),
        ("crypto", &["parley-spec"]),
        ("federation", &["parley-spec", "parley-crypto"]),
        ("server", &["parley-spec", "parley-crypto", "parley-federation"]),
        ("client-sdk", &["parley-spec", "parley-crypto"]),
    ];
    for (krate, allowed) in allowed {
        let internal: BTreeSet<String> = deps(krate).into_iter().filter(|d| d.starts_with("parley-")).collect();
        assert_eq!(internal, set(allowed), "internal dependencies of {krate}/");
    }
}

#[test]
fn only_the_server_serves_http() {
    for web in ["axum", "tower-http", "governor"] {
        assert_eq!(dependents(web), set(&["server"]), "crates depending on {web}");
    }
}

#[test]
fn sql_lives_in_the_server_the_sdk_store_and_the_tests() {
    // The server's storage and the SDK's profile store are SQLite by design; tests read the
    // server's database to check what it stored.
    assert_eq!(dependents("sqlx"), set(&["server", "client-sdk", "tests"]));
    // The server's writer drives its own SQLite connection directly (`storage::writer::sqlite`).
    assert_eq!(dependents("rusqlite"), set(&["server"]));
}

#[test]
fn crypto_primitives_are_used_through_parley_crypto() {
    // Signatures, key agreement and encryption happen only in crypto/; `sha2` is also allowed
    // where a digest is an identifier (server key ids, token hashes), not part of a protocol.
    // MLS too: the rest of the code uses `parley_crypto::mls`, never openmls types.
    for primitive in ["ed25519-dalek", "chacha20poly1305", "hkdf", "hmac", "openmls", "openmls_rust_crypto", "openmls_traits"] {
        assert_eq!(dependents(primitive), set(&["crypto"]), "crates depending on {primitive}");
    }
    // The tests forge key bundles as a malicious server would.
    assert_eq!(dependents("x25519-dalek"), set(&["crypto", "tests"]), "crates depending on x25519-dalek");
    assert!(!deps("client-sdk").contains("sha2"), "the SDK hashes through parley-crypto");
}
