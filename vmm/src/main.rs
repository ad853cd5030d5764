//! `vmm`: Cowbird's KVM virtual machine monitor.
//!
//! Exit status: 0 when the guest powers off or reboots, 1 when the VMM fails, 2 for a bad
//! command line, 3 when the guest crashes (triple fault), 4 when KVM cannot run a vCPU.

use std::process::ExitCode;

use clap::Parser;
use cowbird_daemon::logging::{self, error_line};
use tracing::level_filters::LevelFilter;
use vmm::cli::Cli;
use vmm::exit::{EXIT_USAGE, EXIT_VMM_ERROR};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(LevelFilter::WARN);
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing::debug!(?config, "configuration");
    match vmm::machine::run(&config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: {}", error_line(&e));
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}
