//! The homeserver under test: exactly `parleyd`'s entry point, built as a target of this
//! package so integration tests get it through `CARGO_BIN_EXE_parleyd-it` with the same build.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    parley_server::cli::main()
}
