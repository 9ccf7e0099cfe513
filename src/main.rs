//! The `etcd-backup` binary: parse the command line, set up logging, run the command, map
//! the outcome to an exit code (0 success, 1 failure, 2 bad configuration or usage).

use clap::Parser;
use etcd_backup::cli::{Cli, LogFormat};
use etcd_backup::commands;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat, level: Option<&str>) {
    let filter = level
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Under systemd the journal timestamps every line already.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match (format, under_journal) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).init(),
        (LogFormat::Text, false) => builder.init(),
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log_level.as_deref());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("etcd-backup: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(commands::dispatch(cli.command));
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    if let Err(e) = result {
        eprintln!("etcd-backup: {e}");
        std::process::exit(e.exit_code());
    }
}
