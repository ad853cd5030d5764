//! `vhost-net`: Cowbird's vhost-user-net backend daemon, moving packets between a guest's
//! virtio-net queues and a Linux TAP device.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cowbird_daemon::logging::{self, error_line};
use cowbird_daemon::signals;
use tracing::level_filters::LevelFilter;

use vhost_net::cli::Cli;
use vhost_net::device::{Device, DeviceOptions};
use vhost_net::server::Server;
use vhost_net::tap::Tap;
use vhost_net::MacAddress;

fn main() {
    let cli = Cli::parse();
    logging::init(LevelFilter::INFO);
    tracing::debug!(?cli, "command line");
    if let Err(e) = run(cli) {
        tracing::error!("{}", error_line(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Before any thread exists, so that only the signal thread receives SIGTERM/SIGINT/SIGHUP.
    signals::block()?;
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
    // Stopping stops the queues and exits 0; a TAP the daemon created is not persistent, so
    // the kernel deletes it when the process's descriptors close.
    signals::on_stop((!cli.client).then(|| cli.socket.clone()), move || {
        device.shutdown();
        for pair in 0..device.queue_pairs() {
            if let Some(stats) = device.stats(pair) {
                tracing::info!("pair {pair}: {}", stats.snapshot());
            }
        }
        if device.tap().created() {
            tracing::info!("removing TAP device {}", device.tap().name());
        }
        0
    })?;
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
