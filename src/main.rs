//! The `northstar` binary: parses the command line, sets up logging and the async runtime,
//! and runs the command ([`cli`]), whose answer becomes the exit code. The command line and
//! the benchmarks live in the binary, not the library: the library is the server and its parts,
//! with typed errors; `anyhow` ends here.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use cli::Cli;

mod bench;
mod cli;

fn main() -> ExitCode {
    northstar::heap::bound_arenas();
    cli::init_logging();
    let command = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(cli::run(command)));
    match result {
        Ok(code) => code,
        // The reader of our output went away (`northstar sql … | head`): that ends the
        // command, as it does any Unix tool's, and is not a failure.
        Err(error) if cli::is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", cli::report(&error));
            ExitCode::FAILURE
        }
    }
}
