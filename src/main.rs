//! The `etcd-backup` binary: parse the command line, set up logging, run the command, map
//! the outcome to an exit code (0 success, 1 failure, 2 bad configuration or usage).

use clap::Parser;
use etcd_backup::commands;
use etcd_backup::commands::cli::{Cli, LogFormat};
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

/// Keeps buffers of 128 KiB and more (output chunks, upload parts, the spool buffer) in
/// their own mappings, returned to the system when freed.
///
/// By default glibc raises this threshold after the first such buffer is freed; later ones
/// then come from the heap arenas, whose freed memory stays resident. The peak RSS of a
/// cycle grew with it over the first seconds of the stream: 42 MiB on a 4.4 GiB database
/// against 38 MiB on 1.1 GiB. With a fixed threshold it is 35 MiB, at the same speed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // the one unsafe call of the crate, explained below
fn fix_malloc_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; it runs before any other thread
    // exists, and a refusal (return 0) leaves the default in place, which is harmless.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_malloc_mmap_threshold() {}

fn main() {
    fix_malloc_mmap_threshold();
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
