//! `vmm`: Cowbird's KVM virtual machine monitor (issue 7).
//!
//! Only the command line exists so far: it is parsed and validated, then, since booting is not
//! written yet, the program says so and exits with status 1 rather than pretending to run a VM.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use vmm::cli::Cli;

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
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => {
            // Same exit status as the option errors clap reports itself.
            eprintln!("vmm: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::debug!(?config, "configuration");
    eprintln!("vmm: booting is not implemented yet (see issue 7)");
    ExitCode::FAILURE
}
