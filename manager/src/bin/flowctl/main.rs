//! `flowctl`: use flow without writing code — credentials, a listener, a
//! netcat-like dialer, ping, and a one-command demo.
//!
//! Results go to stdout, logs to stderr (`RUST_LOG`). Errors are one line on
//! stderr; the exit code is 1 for a failure and 2 when a peer was refused or
//! did not trust us.

// Peer input must never panic this code: no unwrap, expect or panic
// outside tests (a peer's bad bytes get a typed error instead).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::todo,
        clippy::unimplemented,
        clippy::unreachable
    )
)]

mod common;
mod creds;
mod demo;
mod dial;
mod listen;
mod ping;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Authenticated, multiplexed flows from the command line.
#[derive(Parser)]
#[command(name = "flowctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage credentials (a principal's key, blessings and trusted roots).
    #[command(subcommand)]
    Creds(creds::CredsCommand),
    /// Listen for flows and echo them, or connect the first one to stdio.
    Listen(listen::ListenArgs),
    /// Dial a flow and connect it to stdin/stdout, like netcat.
    Dial(dial::DialArgs),
    /// Measure the handshake time and round trips to an echoing listener.
    Ping(ping::PingArgs),
    /// Run a proxy, a server behind it and a client, all on loopback.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    common::init_logging();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flowctl: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Creds(c) => creds::run(c),
            Command::Listen(a) => listen::run(a).await,
            Command::Dial(a) => dial::run(a).await,
            Command::Ping(a) => ping::run(a).await,
            Command::Demo(a) => demo::run(a).await,
        }
    });
    // Background tasks (connections) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowctl: {e}");
            ExitCode::from(common::exit_code(&e))
        }
    }
}
