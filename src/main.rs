//! The `ferry` command line: run a VM, or talk to a running one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ferry::config::VmConfig;
use ferry::vmm::{self, VmExit};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "A small KVM VMM with live and storage migration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM from a JSON config (or restore a snapshot) and run it until
    /// it resets or shuts down.
    Run {
        /// The VM config (JSON).
        #[arg(long, required_unless_present = "restore", conflicts_with = "restore")]
        config: Option<PathBuf>,
        /// Restore the snapshot in this directory instead of booting.
        #[arg(long)]
        restore: Option<PathBuf>,
        /// Serve the control API on this Unix socket (overrides the config).
        #[arg(long)]
        api_sock: Option<PathBuf>,
    },
    /// Send a request to a running VM's control socket.
    Ctl {
        /// The VM's control socket.
        #[arg(long)]
        sock: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
}

#[derive(Subcommand, Clone)]
enum CtlAction {
    /// Print the VM's state.
    State,
    /// Pause the vCPUs.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// Stop the VM.
    Shutdown,
    /// Pause the VM (if running) and write a snapshot into DIR; the VM stays
    /// paused.
    Snapshot {
        /// Directory for the snapshot (created if missing).
        dir: PathBuf,
    },
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

fn run(config: Option<PathBuf>, restore: Option<PathBuf>, api_sock: Option<PathBuf>) -> ExitCode {
    let result = match (config, restore) {
        (Some(config), _) => {
            let config = match VmConfig::from_file(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ferry: invalid config:\n{e}");
                    return ExitCode::from(EXIT_BAD_INPUT);
                }
            };
            let api_sock = api_sock.or_else(|| config.api_socket.clone());
            vmm::run(config, api_sock)
        }
        (None, Some(dir)) => vmm::restore(&dir, api_sock),
        (None, None) => {
            eprintln!("ferry: give --config FILE or --restore DIR");
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    match result {
        Ok(VmExit::Reset) | Ok(VmExit::GuestShutdown) | Ok(VmExit::Requested) => ExitCode::SUCCESS,
        Ok(VmExit::Error(why)) => {
            eprintln!("ferry: the VM stopped on an error: {why}");
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::from(if e.is_bad_input() {
                EXIT_BAD_INPUT
            } else {
                EXIT_RUNTIME
            })
        }
    }
}

fn ctl(sock: PathBuf, action: CtlAction) -> ExitCode {
    let (method, path, body) = match &action {
        CtlAction::State => ("GET", "/vm", None),
        CtlAction::Pause => ("PUT", "/vm/pause", None),
        CtlAction::Resume => ("PUT", "/vm/resume", None),
        CtlAction::Shutdown => ("PUT", "/vm/shutdown", None),
        CtlAction::Snapshot { dir } => {
            // The VMM resolves relative paths against its own directory, not
            // ours: send an absolute one.
            let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            (
                "PUT",
                "/snapshot/create",
                Some(serde_json::json!({ "dir": dir })),
            )
        }
    };
    match ferry::api::client::request(&sock, method, path, body.as_ref()) {
        Ok((status, body)) if (200..300).contains(&status) => {
            if !body.is_null() {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&body).unwrap_or_else(|_| body.to_string())
                );
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let msg = body
                .get("error")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string());
            eprintln!("ferry: {method} {path} failed ({status}): {msg}");
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn main() -> ExitCode {
    ferry::mark_process_start();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            restore,
            api_sock,
        } => run(config, restore, api_sock),
        Command::Ctl { sock, action } => ctl(sock, action),
    }
}
