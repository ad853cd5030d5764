//! `vmm`: Cowbird's KVM virtual machine monitor.
//!
//! Exit status: 0 when the guest powers off or reboots, 1 when the VMM fails, 2 for a bad
//! command line, 3 when the guest crashes (triple fault), 4 when KVM cannot run a vCPU.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use vmm::cli::Cli;
use vmm::exit::{EXIT_USAGE, EXIT_VMM_ERROR};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::builder()
                .with_default_directive(LevelFilter::WARN.into())
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
            eprintln!("vmm: {}", describe(&e));
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

/// The error and its causes on one line, leaving out causes the message already quotes.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}
