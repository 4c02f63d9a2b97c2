//! `parleyd`: the Parley homeserver binary (see [`parley_server::cli`]).

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    parley_server::cli::main()
}
