//! `ferry`: live migration of KVM virtual machines.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry::cli;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live migration of KVM virtual machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one VM in this process (boot it from a config, or restore a snapshot).
    Vmm {
        /// VM config file (TOML).
        #[arg(long, conflicts_with = "restore", required_unless_present = "restore")]
        config: Option<PathBuf>,
        /// Snapshot folder to restore from.
        #[arg(long)]
        restore: Option<PathBuf>,
        /// With --restore: put the restored disk images here instead of at their
        /// original paths.
        #[arg(long, requires = "restore")]
        disk_dir: Option<PathBuf>,
        /// Control socket path.
        #[arg(long)]
        control: PathBuf,
        /// Create the VM but do not start its vCPUs until `ferry resume`.
        #[arg(long)]
        paused: bool,
    },
    /// Show a VM's state and the guest's counters.
    Status {
        #[arg(long)]
        control: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Pause a VM's vCPUs.
    Pause {
        #[arg(long)]
        control: PathBuf,
    },
    /// Resume a paused VM.
    Resume {
        #[arg(long)]
        control: PathBuf,
    },
    /// Make the guest re-check every page and disk block it wrote; exits 3 on errors.
    Verify {
        #[arg(long)]
        control: PathBuf,
        #[arg(long)]
        json: bool,
        /// Give up after this long.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Write a point-in-time snapshot (memory, state, config, disks) and keep running.
    Snapshot {
        #[arg(long)]
        control: PathBuf,
        /// New folder for the snapshot.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Log dirty pages for a while and compare with what the guest says it wrote.
    DirtyRate {
        #[arg(long)]
        control: PathBuf,
        #[arg(long, default_value_t = 1000)]
        duration_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// Stop the VM and its process.
    Quit {
        #[arg(long)]
        control: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vmm {
            config,
            restore,
            disk_dir,
            control,
            paused,
        } => cli::vmm::run(
            cli::vmm::Source::new(config, restore, disk_dir),
            &control,
            paused,
        ),
        Command::Status { control, json } => cli::client::status(&control, json),
        Command::Pause { control } => cli::client::simple(&control, "pause"),
        Command::Resume { control } => cli::client::simple(&control, "resume"),
        Command::Quit { control } => cli::client::simple(&control, "quit"),
        Command::Verify {
            control,
            json,
            timeout_secs,
        } => cli::client::verify(&control, json, timeout_secs),
        Command::Snapshot { control, out, json } => cli::client::snapshot(&control, &out, json),
        Command::DirtyRate {
            control,
            duration_ms,
            json,
        } => cli::client::dirty_rate(&control, duration_ms, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}
