//! `vhost-net`: Cowbird's vhost-user-net backend daemon, moving packets between a guest's
//! virtio-net queues and a Linux TAP device.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use vhost_net::cli::Cli;
use vhost_net::device::{Device, DeviceOptions};
use vhost_net::mac::MacAddress;
use vhost_net::server::Server;
use vhost_net::shutdown;
use vhost_net::tap::Tap;

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::builder()
                .with_default_directive(LevelFilter::INFO.into())
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    tracing::debug!(?cli, "command line");
    if let Err(e) = run(cli) {
        tracing::error!("{}", error_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, without repeating causes whose text the message
/// already contains.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Before any thread exists, so that only the signal thread receives SIGTERM/SIGINT/SIGHUP.
    shutdown::block_signals()?;
    let mac = match cli.mac {
        Some(mac) => mac,
        None => MacAddress::random_local().context("choosing a MAC address")?,
    };
    let tap = Tap::open(&cli.tap, cli.num_queue_pairs)?;
    if let Some(mtu) = cli.mtu {
        tap.set_mtu(mtu)?;
    }
    if let Some(cidr) = &cli.host_ip {
        tap.add_address(cidr)?;
    }
    tap.set_up()?;
    let tap_name = tap.name().to_owned();
    let created = tap.created();
    let device = Arc::new(
        Device::new(
            tap,
            DeviceOptions {
                queue_pairs: cli.num_queue_pairs,
                queue_size: cli.queue_size,
                mac,
                mtu: cli.mtu,
            },
        )
        .context("invalid device options")?,
    );
    let mut server = if cli.client {
        Server::client(&cli.socket, device.clone())
    } else {
        Server::bind(&cli.socket, device.clone())?
    };
    shutdown::spawn_handler(device, (!cli.client).then(|| cli.socket.clone()))?;
    tracing::info!(
        "{} TAP {tap_name}{} for guest MAC {mac}, {} queue pair(s) of up to {} entries, {} {}",
        if created { "created" } else { "attached to" },
        cli.host_ip.map(|c| format!(" ({c})")).unwrap_or_default(),
        cli.num_queue_pairs,
        cli.queue_size,
        if cli.client {
            "connecting to"
        } else {
            "listening on"
        },
        cli.socket.display(),
    );
    server
        .run()
        .with_context(|| format!("serving {}", cli.socket.display()))
}
