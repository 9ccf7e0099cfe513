//! The subcommands: load what they need, call the library, print the result.

pub mod cli;

mod backups;
mod defrag;
mod restore;
mod snapshot;

use crate::commands::cli::{Command, ConfigArg};
use crate::config::{Config, ConfigError};
use crate::daemon;
use crate::store::BackupStore;

/// How a command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad configuration or usage: exit code 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Anything else: exit code 1.
    #[error("{0}")]
    Failed(String),
}

impl CommandError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CommandError::Config(_) => 2,
            CommandError::Failed(_) => 1,
        }
    }
}

fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError::Failed(e.to_string())
}

/// Runs a parsed command.
///
/// # Errors
/// [`CommandError`] with a message for the operator.
pub async fn dispatch(cmd: Command) -> Result<(), CommandError> {
    match cmd {
        Command::Run(ConfigArg { config }) => {
            let cfg = Config::load(&config)?;
            daemon::run(cfg).await.map_err(failed)
        }
        Command::Snapshot { config, endpoint } => {
            let cfg = Config::load(&config.config)?;
            snapshot::snapshot(&cfg, endpoint.as_deref()).await
        }
        Command::Status { config, json } => {
            let cfg = Config::load(&config.config)?;
            snapshot::status(&cfg, json).await
        }
        Command::List {
            config,
            json,
            cluster_id,
        } => {
            let cfg = Config::load(&config.config)?;
            backups::list(&cfg, json, cluster_id).await
        }
        Command::Verify {
            config,
            backup,
            all,
            file,
            identity,
            json,
            cluster_id,
        } => match file {
            Some(file) => backups::verify_file(&file, json).await,
            None => {
                let cfg = Config::load(&config)?;
                let which = backups::Which {
                    backup: &backup,
                    cluster_id,
                };
                backups::verify_backups(&cfg, &which, all, json, identity.as_deref()).await
            }
        },
        Command::Restore {
            config,
            backup,
            output,
            identity,
            data_dir,
            name,
            peer_url,
            initial_cluster,
            cluster_id,
            no_bump,
            bump_revision,
            to_revision,
            to_time,
            snapshot_only,
        } => {
            let cfg = Config::load(&config.config)?;
            if to_revision.is_some() || to_time.is_some() {
                return restore::restore_point_in_time(
                    &cfg,
                    &backup,
                    cluster_id,
                    (to_revision, to_time.as_deref()),
                    &output,
                    identity.as_deref(),
                )
                .await;
            }
            let member = data_dir
                .map(|dir| restore::RestoreMember::new(dir, name, peer_url, initial_cluster));
            let which = backups::Which {
                backup: &backup,
                cluster_id,
            };
            let bump = restore::BumpChoice::from_flags(no_bump, bump_revision);
            restore::restore(
                &cfg,
                &which,
                &output,
                member,
                identity.as_deref(),
                bump,
                snapshot_only,
            )
            .await
        }
        Command::Prune {
            config,
            dry_run,
            json,
            cluster_id,
        } => {
            let cfg = Config::load(&config.config)?;
            backups::prune(&cfg, dry_run, json, cluster_id).await
        }
        Command::Keygen { output } => {
            let recipient = crate::codec::crypt::keygen(&output).map_err(failed)?;
            println!("{recipient}");
            eprintln!(
                "wrote the identity (secret key) to {}; put the public key above into [encryption] recipients and keep the file safe: without it encrypted backups cannot be restored",
                output.display()
            );
            Ok(())
        }
        Command::Drill { config, identity } => {
            let cfg = Config::load(&config.config)?;
            restore::drill(&cfg, identity.as_deref()).await
        }
        Command::Defrag { config, dry_run } => {
            let cfg = Config::load(&config.config)?;
            defrag::defrag(&cfg, dry_run).await
        }
        Command::GenDocs { out } => gen_docs(&out).map_err(failed),
        Command::CheckConfig(ConfigArg { config }) => {
            let cfg = Config::load(&config)?;
            print!("{}", cfg.to_redacted_toml());
            if let Some(w) = crate::config::permission_warning(&config) {
                eprintln!("warning: {w}");
            }
            eprintln!("{}: configuration is valid", config.display());
            Ok(())
        }
    }
}

/// Opens the configured store.
///
/// # Errors
/// When the store cannot be set up.
pub fn open_store(cfg: &Config) -> Result<BackupStore, CommandError> {
    BackupStore::open(&cfg.storage, &cfg.backup.cluster_name).map_err(failed)
}

/// Writes `man/etcd-backup.1`, one page per subcommand, and bash/zsh/fish completions.
fn gen_docs(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let cmd = cli::Cli::command();
    let man = out.join("man");
    let comp = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "etcd-backup", &comp)?;
    }
    eprintln!(
        "wrote man pages to {} and completions to {}",
        man.display(),
        comp.display()
    );
    Ok(())
}
