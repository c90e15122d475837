//! The `ferry` command line: run a VM, or talk to a running one.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use ferry::api::client::{self, ClientError};
use ferry::config::VmConfig;
use ferry::migration::{MigrationStatus, Phase};
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
    // One required group, so that the usage error names both ways to start.
    #[command(group(ArgGroup::new("start").required(true).args(["config", "restore"])))]
    Run {
        /// The VM config (JSON).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Restore the snapshot in this directory instead of booting.
        #[arg(long)]
        restore: Option<PathBuf>,
        /// Serve the control API on this Unix socket (overrides the config).
        #[arg(long)]
        api_sock: Option<PathBuf>,
        #[command(flatten)]
        confinement: Confinement,
    },
    /// Wait for one incoming migration, then run the guest it brings.
    Receive {
        /// Address to listen on for the migration stream, e.g. 0.0.0.0:7777.
        #[arg(long, value_parser = listen_address)]
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
        /// Allow migrations with shared storage (no copy), whose files must
        /// then all lie under this directory (symlinks resolved). Without
        /// it, shared storage is refused.
        #[arg(long, value_name = "DIR")]
        shared_storage_root: Option<PathBuf>,
        /// Where the received guest's console goes: "stdout" (the default)
        /// or a file, created 0600 or appended to. The path in the sent
        /// config is never used.
        #[arg(long, value_name = "stdout|FILE")]
        serial: Option<String>,
        /// The tap of this host each net device of the guest attaches to
        /// (repeatable, one per device: the sent config's tap names are
        /// never used). A guest with a net device not named here is refused.
        #[arg(long = "tap", value_name = "ID=TAP", value_parser = tap_mapping)]
        taps: Vec<(String, String)>,
        /// This host's certificates: ca.pem (the CA peers must chain to),
        /// cert.pem, key.pem (see `ferry tls-init`).
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// Take migrations only from clients whose certificate names this
        /// host or IP (repeatable; default: any certificate from the CA).
        #[arg(long = "allow-client", value_name = "NAME")]
        allow_client: Vec<String>,
        /// Plaintext and unauthenticated: anyone who reaches the port can
        /// migrate a guest here. Only for isolated test networks.
        #[arg(long, conflicts_with_all = ["tls_dir", "allow_client"])]
        insecure: bool,
        #[command(flatten)]
        confinement: Confinement,
    },
    /// Make a CA and one certificate per host, for migrating without a PKI:
    /// OUT/ca.pem, OUT/ca-key.pem and OUT/<host>/{ca.pem,cert.pem,key.pem},
    /// each OUT/<host> a ready --tls-dir.
    TlsInit {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// A host name or IP address the peer dials (repeatable).
        #[arg(long = "host", value_name = "NAME_OR_IP", required = true)]
        hosts: Vec<String>,
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

/// How `run` and `receive` confine themselves once set up (docs/security.md).
#[derive(clap::Args)]
struct Confinement {
    /// What a syscall outside the seccomp filters does: kill the process
    /// (naming the syscall), log it and go on, or no filters at all
    /// (debugging only).
    #[arg(long, value_enum, default_value_t = ferry::security::SeccompMode::Kill)]
    seccomp: ferry::security::SeccompMode,
    /// Started as root: become this user once /dev/kvm, images, sockets,
    /// the share directory and TLS files are open (needs --gid).
    #[arg(long, requires = "gid")]
    uid: Option<u32>,
    /// The group to become with --uid (supplementary groups are dropped).
    #[arg(long, requires = "uid")]
    gid: Option<u32>,
    /// `ferry run` with --uid: also change root to DIR once set up, so that
    /// paths given later (`ctl snapshot DIR`, a TLS directory) name files
    /// inside it. The control socket must lie inside DIR.
    #[arg(long, requires = "uid", value_name = "DIR")]
    chroot: Option<PathBuf>,
}

impl Confinement {
    /// Records the choice for the library; a bad --uid/--gid is a usage
    /// error, before anything is opened.
    fn configure(&self) -> Result<(), ExitCode> {
        let jail = match (self.uid, self.gid) {
            (Some(uid), Some(gid)) => {
                match ferry::security::Jail::check(uid, gid).and_then(|j| match &self.chroot {
                    Some(dir) => j.with_root(dir),
                    None => Ok(j),
                }) {
                    Ok(j) => Some(j),
                    Err(e) => {
                        say(format_args!("ferry: {e}"));
                        return Err(ExitCode::from(EXIT_BAD_INPUT));
                    }
                }
            }
            _ => None,
        };
        if self.seccomp == ferry::security::SeccompMode::None {
            eprintln!("ferry: --seccomp none: no syscall filters; for debugging only");
        }
        ferry::security::configure(ferry::security::Settings {
            seccomp: self.seccomp,
            jail,
        });
        Ok(())
    }
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
        /// This host's certificates (ca.pem, cert.pem, key.pem); the
        /// destination's certificate must name the host or IP of --to.
        #[arg(long)]
        tls_dir: Option<PathBuf>,
        /// Plaintext and unauthenticated, to an --insecure ferry receive.
        #[arg(long, conflicts_with = "tls_dir")]
        insecure: bool,
        /// TCP connections guest memory travels over (1 to 8); the
        /// default is one per CPU of the source host, at most 4.
        #[arg(long)]
        connections: Option<u32>,
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

/// A `--listen` that cannot name an address is a usage error (exit 2), found
/// before anything starts.
fn listen_address(text: &str) -> Result<String, String> {
    use std::net::ToSocketAddrs;
    match text.to_socket_addrs().map(|mut addrs| addrs.next()) {
        Ok(Some(_)) => Ok(text.to_string()),
        Ok(None) => Err("names no address".to_string()),
        Err(e) => Err(format!(
            "{} (give HOST:PORT, e.g. 0.0.0.0:7777)",
            ferry::util::io_msg(&e)
        )),
    }
}

/// `--tap ID=TAP`.
fn tap_mapping(text: &str) -> Result<(String, String), String> {
    let Some((id, tap)) = text.split_once('=') else {
        return Err("give ID=TAP, e.g. n0=tap0".to_string());
    };
    if id.is_empty() {
        return Err("the device id before '=' is empty".to_string());
    }
    ferry::devices::virtio::net::check_tap_name(tap).map_err(|e| e.to_string())?;
    Ok((id.to_string(), tap.to_string()))
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;

/// With `--chroot DIR` the control socket must lie inside DIR, so that the
/// confined VM can still remove it at exit; returned as the host path with
/// a canonical parent (what the server removes, seen from the new root).
fn socket_in_jail(label: &str, path: PathBuf) -> Result<PathBuf, ExitCode> {
    let Some(root) = ferry::security::jail().and_then(|j| j.root.map(|r| (j, r))) else {
        return Ok(path);
    };
    let (jail, root) = root;
    match jail.inside(&path) {
        Some(inner) => Ok(root.join(inner.strip_prefix("/").unwrap_or(&inner))),
        None => {
            say(format_args!(
                "ferry: {label} {}: must lie inside --chroot {}, so that the confined VM can remove it at exit",
                path.display(),
                root.display()
            ));
            Err(ExitCode::from(EXIT_BAD_INPUT))
        }
    }
}

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
            ferry::startup::mark("config");
            let label = if api_sock.is_some() {
                "--api-sock"
            } else {
                "api_socket"
            };
            let api_sock = api_sock.or_else(|| config.api_socket.clone());
            if let Some(Err(code)) = api_sock.as_deref().map(|p| check_socket_path(label, p)) {
                return code;
            }
            let api_sock = match api_sock.map(|p| socket_in_jail(label, p)).transpose() {
                Ok(p) => p,
                Err(code) => return code,
            };
            vmm::run(config, api_sock)
        }
        (None, Some(dir)) => {
            if let Some(Err(code)) = api_sock
                .as_deref()
                .map(|p| check_socket_path("--api-sock", p))
            {
                return code;
            }
            let api_sock = match api_sock
                .map(|p| socket_in_jail("--api-sock", p))
                .transpose()
            {
                Ok(p) => p,
                Err(code) => return code,
            };
            vmm::restore(&dir, api_sock)
        }
        (None, None) => {
            say(format_args!("ferry: give --config FILE or --restore DIR"));
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
    if sock.is_dir() {
        say(format_args!(
            "ferry: --sock {0}: {0} is a directory, not a control socket (give the socket \
             file: ferry run --api-sock PATH)",
            sock.display()
        ));
        return ExitCode::from(EXIT_BAD_INPUT);
    }
    if let CtlAction::Migrate {
        to,
        max_downtime_ms,
        bandwidth_mib_s,
        tls_dir,
        insecure,
        connections,
    } = &action
    {
        if tls_dir.is_none() && !insecure {
            say(format_args!(
                "ferry: migrate needs --tls-dir DIR (this host's certificates, see ferry tls-init), \
                 or --insecure for an unauthenticated plaintext migration"
            ));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
        // The VMM resolves relative paths against its own directory.
        let tls_dir = tls_dir
            .as_ref()
            .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()));
        return migrate(
            &sock,
            to,
            *max_downtime_ms,
            *bandwidth_mib_s,
            tls_dir.as_deref(),
            *insecure,
            *connections,
        );
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
    match client::request_typed::<serde_json::Value>(&sock, method, path, body.as_ref()) {
        Ok(body) if body.is_null() => ExitCode::SUCCESS,
        Ok(body) => {
            let text = serde_json::to_string_pretty(&body).unwrap_or_else(|_| body.to_string());
            match writeln!(io::stdout(), "{text}").and_then(|()| io::stdout().flush()) {
                Ok(()) => ExitCode::SUCCESS,
                // `ferry ctl ... | head -1`: the reader has all it wanted.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    say(format_args!(
                        "ferry: cannot write the answer: {}",
                        ferry::util::io_msg(&e)
                    ));
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Err(e) => {
            say(format_args!("ferry: {e}"));
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// One line to stderr. Unlike `eprintln!`, a closed stderr does not panic:
/// there is nobody left to tell.
fn say(line: std::fmt::Arguments) {
    let _ = writeln!(io::stderr(), "{line}");
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// `n pass` or `n passes`.
fn passes(n: u32) -> String {
    format!("{n} pass{}", if n == 1 { "" } else { "es" })
}

/// Memory progress as (done, total) bytes: the pass in progress, as far as
/// it got. A whole-VM ratio (bytes sent over RAM size) would fill up halfway
/// through a migration with many passes.
fn memory_progress(s: &MigrationStatus) -> (u64, u64) {
    if s.phase == Phase::Completed || s.pass_bytes == 0 && s.pass > 0 {
        // Done, or a pass with nothing to copy.
        let total = s.pass_bytes.max(1);
        return (total, total);
    }
    (s.pass_done_bytes.min(s.pass_bytes), s.pass_bytes)
}

/// Disk progress as (copied, total) bytes, when the migration copies disks.
fn disk_progress(s: &MigrationStatus) -> Option<(u64, u64)> {
    (s.storage_total_bytes > 0).then(|| {
        (
            s.storage_copied_bytes.min(s.storage_total_bytes),
            s.storage_total_bytes,
        )
    })
}

fn percent((done, total): (u64, u64)) -> f64 {
    if total == 0 {
        0.0
    } else {
        done as f64 * 100.0 / total as f64
    }
}

fn phase_name(phase: Phase) -> String {
    serde_json::to_value(phase)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{phase:?}"))
}

/// The figures that do not fit a bar.
fn rates(s: &MigrationStatus) -> String {
    format!(
        "sent {:.1} MiB, dirty {:.1} MiB/s, bw {:.1} MiB/s, left {:.1} MiB, est. downtime {:.1} ms, throttle {}%",
        mib(s.bytes_sent),
        s.dirty_rate_mib_s,
        s.bandwidth_mib_s,
        mib(s.remaining_bytes),
        s.expected_downtime_ms,
        s.throttle_percent,
    )
}

/// One self-contained progress line, for logs.
fn progress_line(s: &MigrationStatus) -> String {
    let memory = memory_progress(s);
    let mut line = format!(
        "{} pass {}: memory {:.1}/{:.1} MiB ({:.0}%)",
        phase_name(s.phase),
        s.pass,
        mib(memory.0),
        mib(memory.1),
        percent(memory)
    );
    if let Some(disk) = disk_progress(s) {
        line += &format!(
            ", disks {:.1}/{:.1} MiB ({:.0}%), {} writes mirrored",
            mib(disk.0),
            mib(disk.1),
            percent(disk),
            s.mirrored_writes
        );
    }
    line + "; " + &rates(s)
}

/// How `ferry ctl migrate` shows progress: bars that redraw in place on a
/// terminal, else a line per phase or pass.
enum Progress {
    /// Each bar appears with the first status that has something for it.
    Bars {
        multi: MultiProgress,
        memory: Option<ProgressBar>,
        disk: Option<ProgressBar>,
        info: Option<ProgressBar>,
    },
    Lines {
        last: Option<(Phase, u32)>,
        printed_at: Instant,
    },
}

/// Plain lines come at most this often, however fast passes go by...
const LINE_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// ...and at least this often during a long pass.
const LINE_MAX_INTERVAL: Duration = Duration::from_secs(10);

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("#>-")
}

impl Progress {
    fn new() -> Progress {
        // The progress goes to stderr, like every other ferry message: that
        // is the stream to ask about.
        if !io::stderr().is_terminal() {
            return Progress::Lines {
                last: None,
                printed_at: Instant::now(),
            };
        }
        Progress::Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            memory: None,
            disk: None,
            info: None,
        }
    }

    fn show(&mut self, s: &MigrationStatus) {
        match self {
            Progress::Bars {
                multi,
                memory,
                disk,
                info,
            } => {
                let (done, total) = memory_progress(s);
                let memory = memory.get_or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(total.max(1)));
                    bar.set_style(bar_style(
                        "{prefix:<13} [{wide_bar}] {binary_bytes:>10} / {binary_total_bytes:<10}",
                    ));
                    bar
                });
                memory.set_prefix(format!("memory pass {}", s.pass));
                memory.set_length(total.max(1));
                memory.set_position(done);
                if let Some((copied, total)) = disk_progress(s) {
                    let bar = disk.get_or_insert_with(|| {
                        let bar = multi.insert_after(memory, ProgressBar::new(total));
                        bar.set_style(bar_style(
                            "{prefix:<13} [{wide_bar}] {binary_bytes:>10} / {binary_total_bytes:<10} {msg}",
                        ));
                        bar.set_prefix("disks");
                        bar
                    });
                    bar.set_length(total);
                    bar.set_position(copied);
                    bar.set_message(format!("{} mirrored", s.mirrored_writes));
                }
                let info = info.get_or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(1));
                    bar.set_style(bar_style("{wide_msg}"));
                    bar
                });
                info.set_message(format!("{}: {}", phase_name(s.phase), rates(s)));
            }
            Progress::Lines { last, printed_at } => {
                let now = (s.phase, s.pass);
                let changed = *last != Some(now);
                let since = printed_at.elapsed();
                if (changed && since >= LINE_MIN_INTERVAL)
                    || since >= LINE_MAX_INTERVAL
                    || (changed && last.is_none())
                {
                    say(format_args!("{}", progress_line(s)));
                    *last = Some(now);
                    *printed_at = Instant::now();
                }
            }
        }
    }

    /// The last state, before the summary line.
    fn finish(&mut self, s: Option<&MigrationStatus>) {
        match self {
            Progress::Bars {
                memory, disk, info, ..
            } => {
                for bar in [memory.as_ref(), disk.as_ref(), info.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    bar.abandon();
                }
            }
            Progress::Lines { last, .. } => {
                if let Some(s) = s.filter(|s| *last != Some((s.phase, s.pass))) {
                    say(format_args!("{}", progress_line(s)));
                }
            }
        }
    }
}

/// Starts a migration and follows it until it ends.
fn migrate(
    sock: &Path,
    to: &str,
    max_downtime_ms: u64,
    bandwidth: Option<u64>,
    tls_dir: Option<&Path>,
    insecure: bool,
    connections: Option<u32>,
) -> ExitCode {
    let mut req = serde_json::json!({
        "destination": to,
        "max_downtime_ms": max_downtime_ms,
        "bandwidth_mib_s": bandwidth,
        "connections": connections,
    });
    match tls_dir {
        Some(d) => req["tls_dir"] = serde_json::json!(d),
        None => req["insecure"] = serde_json::json!(insecure),
    }
    match client::request_typed::<MigrationStatus>(sock, "PUT", "/migration/send", Some(&req)) {
        Ok(_) => {}
        Err(ClientError::Status {
            status, message, ..
        }) => {
            say(format_args!(
                "ferry: migration refused ({status}): {message}"
            ));
            return ExitCode::from(EXIT_RUNTIME);
        }
        Err(e) => {
            say(format_args!("ferry: {e}"));
            return ExitCode::from(EXIT_RUNTIME);
        }
    }
    let mut progress = Progress::new();
    let mut handed_over = false;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let status = match client::request_typed::<MigrationStatus>(sock, "GET", "/migration", None)
        {
            Ok(s) => s,
            Err(ClientError::Status {
                status, message, ..
            }) => {
                progress.finish(None);
                say(format_args!(
                    "ferry: cannot read progress ({status}): {message}"
                ));
                return ExitCode::from(EXIT_RUNTIME);
            }
            // The source exits once the guest runs at the destination: the
            // socket going away right after the hand-over is how success
            // can look. Going away before it is not.
            Err(e) if handed_over => {
                progress.finish(None);
                say(format_args!(
                    "ferry: the source has stopped after handing the guest over to {to} ({e})"
                ));
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                progress.finish(None);
                say(format_args!(
                    "ferry: lost the source VM before the hand-over: {e}"
                ));
                return ExitCode::from(EXIT_RUNTIME);
            }
        };
        handed_over |= status.handed_over;
        progress.show(&status);
        match status.phase {
            Phase::Completed => {
                progress.finish(Some(&status));
                say(format_args!(
                    "ferry: migrated to {to} in {:.1} ms: downtime {:.1} ms, {:.1} MiB sent in {}",
                    status.elapsed_ms,
                    status.downtime_ms.unwrap_or(0.0),
                    mib(status.bytes_sent),
                    passes(status.pass)
                ));
                return ExitCode::SUCCESS;
            }
            Phase::Failed | Phase::Cancelled => {
                progress.finish(Some(&status));
                let phase = phase_name(status.phase);
                let why = status.error.as_deref().unwrap_or("no reason given");
                if handed_over {
                    say(format_args!(
                        "ferry: migration {phase} after the hand-over: {why}; the guest stays paused here so that it never runs twice: check {to}"
                    ));
                } else {
                    say(format_args!(
                        "ferry: migration {phase}: {why}; the guest runs on here"
                    ));
                }
                return ExitCode::from(EXIT_RUNTIME);
            }
            _ => {}
        }
    }
}

/// Refuses a directory where a socket path belongs, before anything starts:
/// otherwise the error comes late and talks about sockets.
fn check_socket_path(flag: &str, path: &Path) -> Result<(), ExitCode> {
    if path.is_dir() {
        say(format_args!(
            "ferry: {flag} {0}: {0} is a directory; give the path of the socket file",
            path.display()
        ));
        return Err(ExitCode::from(EXIT_BAD_INPUT));
    }
    Ok(())
}

struct ReceiveSecurity {
    tls_dir: Option<PathBuf>,
    allow_client: Vec<String>,
    insecure: bool,
}

fn receive(
    listen: &str,
    dir: Option<PathBuf>,
    paused: bool,
    api_sock: Option<PathBuf>,
    policy: ferry::migration::destination::ReceivePolicy,
    sec: ReceiveSecurity,
) -> ExitCode {
    ferry::migration::share::server::keep_large_buffers();
    if let Some(sock) = &api_sock {
        if let Err(code) = check_socket_path("--api-sock", sock) {
            return code;
        }
    }
    if let Some(d) = &dir {
        let problem = match std::fs::metadata(d) {
            Ok(meta) if meta.is_dir() => None,
            Ok(_) => Some("not a directory".to_string()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Some("no such directory (create it first)".to_string())
            }
            Err(e) => Some(ferry::util::io_msg(&e)),
        };
        if let Some(problem) = problem {
            say(format_args!("ferry: --dir {}: {problem}", d.display()));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    }
    use ferry::migration::transport::{peer_name, Security, TlsIdentity};
    // Like --dir: a bad flag is named before the question of security.
    let policy = match policy.canonical() {
        Ok(p) => p,
        Err(e) => {
            say(format_args!("ferry: {e}"));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let security = match (&sec.tls_dir, sec.insecure) {
        (Some(d), _) => match TlsIdentity::load(d) {
            Ok(id) => Security::Tls(std::sync::Arc::new(id)),
            Err(e) => {
                say(format_args!("ferry: {e}"));
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        },
        (None, true) => {
            eprintln!(
                "ferry: --insecure: migrations here are plaintext and unauthenticated; anyone who reaches the port can send a guest"
            );
            Security::Insecure
        }
        (None, false) => {
            say(format_args!(
                "ferry: receive needs --tls-dir DIR (ca.pem, cert.pem, key.pem; see ferry tls-init), \
                 or --insecure to take unauthenticated plaintext migrations"
            ));
            return ExitCode::from(EXIT_BAD_INPUT);
        }
    };
    let mut allow_clients = Vec::new();
    for name in &sec.allow_client {
        match peer_name(name) {
            Ok(n) => allow_clients.push(n),
            Err(e) => {
                say(format_args!("ferry: --allow-client: {e}"));
                return ExitCode::from(EXIT_BAD_INPUT);
            }
        }
    }
    finish(vmm::receive(
        listen,
        dir.as_deref(),
        api_sock,
        paused,
        policy,
        security,
        allow_clients,
    ))
}

fn tls_init(out: &std::path::Path, hosts: &[String]) -> ExitCode {
    match ferry::migration::transport::tls_init(out, hosts) {
        Ok(dirs) => {
            for d in dirs {
                println!("{}", d.display());
            }
            eprintln!(
                "ferry: give each host its own directory as --tls-dir; keep {} off the hosts",
                out.join(ferry::migration::transport::CA_KEY_FILE).display()
            );
            ExitCode::SUCCESS
        }
        Err(e @ ferry::migration::transport::TlsError::BadName(_)) => {
            say(format_args!("ferry: --host: {e}"));
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(e) => {
            say(format_args!("ferry: tls-init: {e}"));
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn main() -> ExitCode {
    ferry::mark_process_start();
    let cli = Cli::parse();
    ferry::startup::mark("cli");
    match cli.command {
        Command::Run {
            config,
            restore,
            api_sock,
            confinement,
        } => match confinement.configure() {
            Ok(()) => run(config, restore, api_sock),
            Err(code) => code,
        },
        Command::Ctl { sock, action } => ctl(sock, action),
        Command::Receive {
            listen,
            dir,
            paused,
            api_sock,
            shared_storage_root,
            serial,
            taps,
            tls_dir,
            allow_client,
            insecure,
            confinement,
        } => {
            if let Some(dir) = &confinement.chroot {
                say(format_args!(
                    "ferry: --chroot {}: only for ferry run: a receive opens files by path after set-up (the guest's copies, its control socket); use --uid/--gid",
                    dir.display()
                ));
                return ExitCode::from(EXIT_BAD_INPUT);
            }
            if let Err(code) = confinement.configure() {
                return code;
            }
            let serial = match serial.as_deref() {
                None | Some("stdout") => ferry::config::SerialConfig::Stdout,
                Some("") => {
                    say(format_args!(
                        "ferry: --serial: give \"stdout\" or a file path"
                    ));
                    return ExitCode::from(EXIT_BAD_INPUT);
                }
                Some(path) => ferry::config::SerialConfig::File(
                    std::path::absolute(path).unwrap_or_else(|_| PathBuf::from(path)),
                ),
            };
            let policy = ferry::migration::destination::ReceivePolicy {
                shared_storage_root,
                serial,
                taps,
            };
            receive(
                &listen,
                dir,
                paused,
                api_sock,
                policy,
                ReceiveSecurity {
                    tls_dir,
                    allow_client,
                    insecure,
                },
            )
        }
        Command::TlsInit { out, hosts } => tls_init(&out, &hosts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: Phase, pass: u32, done: u64, of: u64) -> MigrationStatus {
        MigrationStatus {
            phase,
            pass,
            pass_bytes: of,
            pass_done_bytes: done,
            memory_bytes: 256 << 20,
            bytes_sent: 5 * (256 << 20),
            ..Default::default()
        }
    }

    #[test]
    fn memory_progress_is_the_pass_in_progress() {
        // Pass 5 of a busy guest: far more sent than RAM, the pass half done.
        let s = status(Phase::Precopy, 5, 8 << 20, 16 << 20);
        assert_eq!(memory_progress(&s), (8 << 20, 16 << 20));
        assert_eq!(percent(memory_progress(&s)), 50.0);
        // Wire bytes run ahead of guest bytes by the frame headers: capped.
        let s = status(Phase::Precopy, 1, 17 << 20, 16 << 20);
        assert_eq!(memory_progress(&s), (16 << 20, 16 << 20));
        // A pass with nothing dirty is complete, not 0 of 0.
        let s = status(Phase::Precopy, 3, 0, 0);
        assert_eq!(percent(memory_progress(&s)), 100.0);
        let s = status(Phase::Completed, 2, 0, 4096);
        assert_eq!(percent(memory_progress(&s)), 100.0);
        // Before the first pass: nothing to show yet.
        let s = status(Phase::Setup, 0, 0, 0);
        assert_eq!(memory_progress(&s), (0, 0));
        assert_eq!(percent(memory_progress(&s)), 0.0);
    }

    #[test]
    fn disk_progress_is_copied_over_total() {
        let mut s = status(Phase::Completed, 1, 1, 1);
        assert_eq!(disk_progress(&s), None);
        s.storage_total_bytes = 2064 << 20;
        s.storage_copied_bytes = 2064 << 20;
        assert_eq!(percent(disk_progress(&s).unwrap()), 100.0);
        s.storage_copied_bytes = 516 << 20;
        assert_eq!(percent(disk_progress(&s).unwrap()), 25.0);
    }

    #[test]
    fn pass_counts_agree_in_number() {
        assert_eq!(passes(1), "1 pass");
        assert_eq!(passes(2), "2 passes");
        assert_eq!(passes(0), "0 passes");
    }

    #[test]
    fn a_plain_line_says_everything() {
        let mut s = status(Phase::Precopy, 2, 4 << 20, 16 << 20);
        s.storage_total_bytes = 8 << 20;
        s.storage_copied_bytes = 2 << 20;
        s.mirrored_writes = 7;
        s.throttle_percent = 20;
        assert_eq!(
            progress_line(&s),
            "precopy pass 2: memory 4.0/16.0 MiB (25%), disks 2.0/8.0 MiB (25%), 7 writes \
             mirrored; sent 1280.0 MiB, dirty 0.0 MiB/s, bw 0.0 MiB/s, left 0.0 MiB, est. \
             downtime 0.0 ms, throttle 20%"
        );
        assert!(progress_line(&status(Phase::StopAndCopy, 1, 1, 1))
            .starts_with("stop-and-copy pass 1: memory"));
    }
}
