//! `parleyd`: the Parley homeserver binary (see [`parley_server::cli`]).

fn main() -> anyhow::Result<()> {
    parley_server::cli::main()
}
