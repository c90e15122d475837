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
    /// Wait for one incoming migration, then run the guest it brings.
    Receive {
        /// Address to listen on for the migration stream, e.g. 0.0.0.0:7777.
        #[arg(long)]
        listen: String,
        /// Where a storage migration puts the VM's files (in a directory
        /// named after the migration), served to the source over NFSv3.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Take the guest over but keep it paused until `ferry ctl resume`.
        #[arg(long)]
        paused: bool,
        /// Serve the control API on this Unix socket (it answers once the
        /// guest runs here).
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
    /// Migrate the running guest to a `ferry receive`, with a progress bar.
    Migrate {
        /// host:port of the destination's `ferry receive --listen`.
        #[arg(long)]
        to: String,
        /// The longest pause the guest may see.
        #[arg(long, default_value_t = ferry::migration::default_max_downtime_ms())]
        max_downtime_ms: u64,
        /// Cap on the migration stream in MiB/s (unlimited by default).
        #[arg(long)]
        bandwidth_mib_s: Option<u64>,
    },
    /// Show the progress of the current (or last) migration.
    MigrationStatus,
    /// Stop the migration in progress; the guest stays here.
    MigrationCancel,
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
    finish(result)
}

fn finish(result: Result<VmExit, vmm::VmmError>) -> ExitCode {
    match result {
        Ok(VmExit::Reset) | Ok(VmExit::GuestShutdown) | Ok(VmExit::Requested) => ExitCode::SUCCESS,
        Ok(VmExit::Migrated {
            destination,
            downtime_ms,
        }) => {
            eprintln!(
                "ferry: the guest now runs at {destination} (downtime {downtime_ms:.1} ms); stopping here"
            );
            ExitCode::SUCCESS
        }
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
    if let CtlAction::Migrate {
        to,
        max_downtime_ms,
        bandwidth_mib_s,
    } = &action
    {
        return migrate(&sock, to, *max_downtime_ms, *bandwidth_mib_s);
    }
    let (method, path, body) = match &action {
        CtlAction::State => ("GET", "/vm", None),
        CtlAction::Pause => ("PUT", "/vm/pause", None),
        CtlAction::Resume => ("PUT", "/vm/resume", None),
        CtlAction::Shutdown => ("PUT", "/vm/shutdown", None),
        CtlAction::MigrationStatus => ("GET", "/migration", None),
        CtlAction::MigrationCancel => ("PUT", "/migration/cancel", None),
        CtlAction::Migrate { .. } => return ExitCode::from(EXIT_BAD_INPUT),
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

fn error_text(body: &serde_json::Value) -> String {
    body.get("error")
        .and_then(|m| m.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Starts a migration and follows it with a progress line until it ends.
fn migrate(
    sock: &std::path::Path,
    to: &str,
    max_downtime_ms: u64,
    bandwidth: Option<u64>,
) -> ExitCode {
    use std::io::Write;
    let req = serde_json::json!({
        "destination": to,
        "max_downtime_ms": max_downtime_ms,
        "bandwidth_mib_s": bandwidth,
    });
    match ferry::api::client::request(sock, "PUT", "/migration/send", Some(&req)) {
        Ok((200, _)) => {}
        Ok((status, body)) => {
            eprintln!("ferry: migration refused ({status}): {}", error_text(&body));
            return ExitCode::from(EXIT_RUNTIME);
        }
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = String::new();
    let mut handed_over = false;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let status = match ferry::api::client::request(sock, "GET", "/migration", None) {
            Ok((200, s)) => s,
            Ok((code, body)) => {
                eprintln!(
                    "\nferry: cannot read progress ({code}): {}",
                    error_text(&body)
                );
                return ExitCode::from(EXIT_RUNTIME);
            }
            // The source exits once the guest runs at the destination: the
            // socket going away right after the hand-over is how success
            // can look. Going away before it is not.
            Err(e) if handed_over => {
                eprintln!(
                    "\nferry: the source has stopped after handing the guest over to {to} ({e})"
                );
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("\nferry: lost the source VM before the hand-over: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        let phase = status["phase"].as_str().unwrap_or("?").to_string();
        handed_over |= status["handed_over"].as_bool().unwrap_or(false);
        let memory = status["memory_bytes"].as_u64().unwrap_or(0);
        let sent = status["bytes_sent"].as_u64().unwrap_or(0);
        let frac = if memory > 0 {
            (sent as f64 / memory as f64).min(1.0)
        } else {
            0.0
        };
        let width = 24;
        let filled = (frac * width as f64) as usize;
        let disk_total = status["storage_total_bytes"].as_u64().unwrap_or(0);
        let disk = if disk_total > 0 {
            format!(
                "  disks {:.0}/{:.0} MiB, {} writes mirrored",
                mib(status["storage_copied_bytes"].as_u64().unwrap_or(0)),
                mib(disk_total),
                status["mirrored_writes"].as_u64().unwrap_or(0)
            )
        } else {
            String::new()
        };
        let line = format!(
            "[{}{}] {:<13} pass {:>2}  sent {:>8.1} MiB  dirty {:>7.1} MiB/s  bw {:>7.1} MiB/s  left {:>7.1} MiB  est. downtime {:>6.1} ms  throttle {:>2}%{disk}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            phase,
            status["pass"].as_u64().unwrap_or(0),
            mib(sent),
            status["dirty_rate_mib_s"].as_f64().unwrap_or(0.0),
            status["bandwidth_mib_s"].as_f64().unwrap_or(0.0),
            mib(status["remaining_bytes"].as_u64().unwrap_or(0)),
            status["expected_downtime_ms"].as_f64().unwrap_or(0.0),
            status["throttle_percent"].as_u64().unwrap_or(0),
        );
        if tty {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else if line != last_line {
            eprintln!("{line}");
        }
        last_line = line;
        match phase.as_str() {
            "completed" => {
                eprintln!(
                    "\nferry: migrated to {to} in {:.1} ms: downtime {:.1} ms, {:.1} MiB sent in {} passes",
                    status["elapsed_ms"].as_f64().unwrap_or(0.0),
                    status["downtime_ms"].as_f64().unwrap_or(0.0),
                    mib(sent),
                    status["pass"].as_u64().unwrap_or(0)
                );
                return ExitCode::SUCCESS;
            }
            "failed" | "cancelled" => {
                let why = status["error"].as_str().unwrap_or("no reason given");
                if handed_over {
                    eprintln!(
                        "\nferry: migration {phase} after the hand-over: {why}; the guest stays paused here so that it never runs twice: check {to}"
                    );
                } else {
                    eprintln!("\nferry: migration {phase}: {why}; the guest runs on here");
                }
                return ExitCode::from(EXIT_RUNTIME);
            }
            _ => {}
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
        Command::Receive {
            listen,
            dir,
            paused,
            api_sock,
        } => finish(vmm::receive(&listen, dir.as_deref(), api_sock, paused)),
    }
}
