//! The command line: `walrelay serve` and the operator commands.
//!
//! The operator commands work on the data dir of a stopped relay, or on a
//! copy of its volume: `wal inspect|verify|dump|replay` only read the log
//! (replay writes nothing but its own state file), `wal repair` and
//! `cursors set|reset` take the data dir's lock and refuse while a relay
//! holds it. Each prints a table by default and JSON with `--json`; errors
//! name the file and byte offset. Exit codes: 0 success (or a clean log),
//! 1 failure or damage found, 2 usage errors.

mod common;
mod cursors;
mod dump;
mod inspect;
mod journal;
mod matcher;
mod repair;
mod replay;
mod scan;
mod verify;

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::ServeArgs;

/// walrelay: a durable write-ahead-log relay for Prometheus remote-write.
#[derive(Debug, Parser)]
#[command(name = "walrelay", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay: accept remote-write, log it durably, ship it to every replica.
    Serve(Box<ServeArgs>),
    /// Inspect, verify, dump, replay or repair the write-ahead log.
    #[command(subcommand)]
    Wal(WalCommand),
    /// Show or move the replicas' checkpoints (their positions in the log).
    #[command(subcommand)]
    Cursors(cursors::CursorsCommand),
}

/// `walrelay wal ...`
#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Segments, records, sizes, time ranges, and each replica's position and lag.
    Inspect(inspect::InspectArgs),
    /// Read every record: checksums, payloads, sequence continuity. Exit 1 on damage.
    Verify(verify::VerifyArgs),
    /// Print records (metadata) or their decoded samples, selected by range or matcher.
    Dump(Box<dump::DumpArgs>),
    /// Send a range of the log to any remote-write URL, resumably. Exit 1 when
    /// records were rejected or could not be read.
    Replay(Box<replay::ReplayArgs>),
    /// Cut a torn tail and move damaged segments or frames aside (never deletes).
    /// Exit 0 when the log is clean afterwards.
    Repair(repair::RepairArgs),
}

/// Parses the command line and runs the command. Exit codes: 0 success,
/// 1 failure (the message says why), 2 usage errors (from clap).
pub fn main() -> ExitCode {
    crate::tls::install_default_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Wal(WalCommand::Inspect(args)) => common::finish(inspect::run(&args)),
        Command::Wal(WalCommand::Verify(args)) => common::finish(verify::run(&args)),
        Command::Wal(WalCommand::Dump(args)) => common::finish(dump::run(&args)),
        Command::Wal(WalCommand::Replay(args)) => common::finish(replay::run(&args)),
        Command::Wal(WalCommand::Repair(args)) => common::finish(repair::run(&args)),
        Command::Cursors(cmd) => common::finish(cursors::run(&cmd)),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("walrelay: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("walrelay")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("walrelay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| crate::server::ServeError::Listen {
                addr: config.listen.to_string(),
                what: "listen",
                source,
            })?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        // A reload reads flags and environment as they were at startup and
        // the file as it is now.
        let source_args = args.clone();
        let reload: crate::server::ReloadSource = Arc::new(move || source_args.resolve());
        crate::server::run(listener, config, shutdown, Some(reload)).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("walrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn signals(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}
