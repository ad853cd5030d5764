//! `vhost-net`: Cowbird's vhost-user-net backend daemon (issue 6).
//!
//! Only the command line exists so far; the datapath is not written, so after validating its
//! arguments the program says so and exits with status 1 rather than pretending to serve.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use vhost_net::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::builder()
                .with_default_directive(LevelFilter::INFO.into())
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .init();
    tracing::debug!(?cli, "command line");
    eprintln!("vhost-net: the packet datapath is not implemented yet (see issue 6)");
    ExitCode::FAILURE
}
