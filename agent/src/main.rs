//! `ferry`: live migration of KVM virtual machines.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry::{cli, migration};
use ferry_api::{Codec, DiskMirror, Mode, Request, StorageMode};

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

/// The policy and the operator's limits, shared by `migrate` and `plan`.
/// Which agent a command asks, and the token it presents.
#[derive(clap::Args)]
struct AgentArgs {
    /// The agent's API.
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "FERRY_AGENT")]
    agent: String,
    /// A file holding the token to present.
    #[arg(long, value_name = "FILE", env = "FERRY_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA certificates (PEM) an https:// agent's certificate is checked against
    /// (default: the public web's roots).
    #[arg(long, value_name = "FILE", env = "FERRY_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// How the migration stream is secured: TLS 1.3 with this host's certificate, both
/// ends authenticated against the CA, or plain TCP on the operator's word.
#[derive(clap::Args, Default)]
struct TlsArgs {
    /// This host's certificate chain (PEM), presented to the other end.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"], conflicts_with = "insecure")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) the other end's certificate must chain to.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Plain TCP: the stream unencrypted and the other end unauthenticated. Both ends
    /// must say so.
    #[arg(long)]
    insecure: bool,
}

impl TlsArgs {
    fn given(&self) -> bool {
        self.tls_cert.is_some() || self.insecure
    }

    /// The files, as absolute paths (the VMM that reads them may run elsewhere).
    fn files(&self) -> anyhow::Result<Option<ferry_api::TlsFiles>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(None);
        };
        Ok(Some(ferry_api::TlsFiles {
            cert: std::path::absolute(cert)?,
            key: std::path::absolute(key)?,
            ca: std::path::absolute(ca)?,
        }))
    }

    /// How an incoming port takes migrations.
    fn transport(&self) -> anyhow::Result<migration::secure::Transport> {
        use migration::secure::Transport;
        match self.files()? {
            Some(f) => Ok(Transport::Tls(std::sync::Arc::new(
                ferry::pki::MigrationTls::load(&f.cert, &f.key, &f.ca)?,
            ))),
            None if self.insecure => Ok(Transport::Insecure),
            None => anyhow::bail!(
                "an incoming migration needs TLS: give this host's --tls-cert, --tls-key and \
                 --tls-ca, or --insecure for plain TCP (and the source must say --insecure too)"
            ),
        }
    }
}

impl AgentArgs {
    fn endpoint(&self) -> cli::agent::Endpoint<'_> {
        cli::agent::Endpoint {
            url: &self.agent,
            token_file: self.token_file.as_deref(),
            ca_file: self.ca_file.as_deref(),
        }
    }
}

#[derive(clap::Args)]
struct PolicyArgs {
    /// Who sets compression, throttling and post-copy while it runs: adaptive
    /// (measures and decides), static (the flags as given), or a peer preset
    /// (qemu-default, libvirt-default, qemu-autoconverge,
    /// libvirt-postcopy-after-precopy, libvirt-copy-storage-sync, kubevirt-default,
    /// kubevirt-dynamic-downtime, cloud-hypervisor).
    #[arg(long, default_value = "adaptive")]
    policy: String,
    /// Codec for memory pages (and, with --copy-storage, disk blocks): auto (the
    /// policy decides), none, lz4 or zstd:N (pinned: the policy keeps it).
    #[arg(long, default_value = "auto")]
    compression: String,
    /// Operator limits from the `[limits]` table of this TOML file (the keys are the
    /// limit flags' names with underscores); a flag given as well wins.
    #[arg(long, value_name = "FILE")]
    limits: Option<PathBuf>,
    /// Switch over once the predicted downtime is this short [default: 300].
    #[arg(long)]
    max_downtime_ms: Option<f64>,
    /// Cap on the migration stream, megabits per second (0 = none) [default: 0].
    #[arg(long)]
    bandwidth_mbit: Option<f64>,
    /// Slow the vCPUs by this share of their time (0-99) while migrating (pinned:
    /// the policy keeps it).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=99))]
    throttle_pct: Option<u32>,
    /// With --copy-storage: hold the guest's disk writes to this many MB/s while its
    /// disks travel (pinned: the policy keeps it; 0 = never hold them back).
    #[arg(long)]
    disk_write_limit_mbps: Option<f64>,
    /// With --copy-storage: background (each pre-copy round sends the blocks written
    /// since the last) or active (each guest write also goes to the destination
    /// before it completes, pacing the guest's writes to the link; pinned).
    #[arg(long, value_parser = ["background", "active"])]
    disk_mirror: Option<String>,
    /// The most the policy may throttle the vCPUs [default: 99].
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=99))]
    max_throttle_pct: Option<u32>,
    /// The policy may switch to post-copy (the migration runs in hybrid mode).
    #[arg(long)]
    allow_postcopy: bool,
    /// Cores compression may use [default: 1].
    #[arg(long)]
    cpu_budget_cores: Option<f64>,
    /// Give up if not done in this many seconds; the VM stays on the source.
    #[arg(long)]
    max_total_secs: Option<f64>,
}

impl PolicyArgs {
    /// The defaults, then the limits file, then the flags.
    fn limits(&self) -> anyhow::Result<ferry::policy::Limits> {
        use ferry::policy::{Limits, LimitsTable};
        let mut limits = Limits::default();
        if let Some(path) = &self.limits {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading limits file {}", path.display()))?;
            limits = LimitsTable::parse(&text)
                .and_then(|t| t.over(limits))
                .with_context(|| format!("limits file {}", path.display()))?;
        }
        let flags = LimitsTable {
            max_downtime_ms: self.max_downtime_ms,
            max_total_secs: self.max_total_secs,
            max_throttle_pct: self.max_throttle_pct,
            allow_postcopy: self.allow_postcopy.then_some(true),
            bandwidth_mbit: self.bandwidth_mbit,
            cpu_budget_cores: self.cpu_budget_cores,
        };
        Ok(flags.over(limits)?)
    }

    /// What an agent takes of these flags: the limits file's table with the flags
    /// over it (the agent puts them over its own). A pinned setting is refused: the
    /// agent's policy decides those.
    fn limits_table(&self) -> anyhow::Result<ferry::policy::LimitsTable> {
        use ferry::policy::LimitsTable;
        let pinned = [
            (self.compression != "auto", "--compression"),
            (self.throttle_pct.is_some(), "--throttle-pct"),
            (
                self.disk_write_limit_mbps.is_some(),
                "--disk-write-limit-mbps",
            ),
            (self.disk_mirror.is_some(), "--disk-mirror"),
        ];
        if let Some((_, flag)) = pinned.iter().find(|(set, _)| *set) {
            anyhow::bail!(
                "{flag} pins a setting, which a migration through the agent leaves to its \
                 policy; set limits instead, or use --control on the host"
            );
        }
        let mut table = match &self.limits {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading limits file {}", path.display()))?;
                LimitsTable::parse(&text)
                    .with_context(|| format!("limits file {}", path.display()))?
            }
            None => LimitsTable::default(),
        };
        let flags = [
            (&mut table.max_downtime_ms, self.max_downtime_ms),
            (&mut table.max_total_secs, self.max_total_secs),
            (&mut table.bandwidth_mbit, self.bandwidth_mbit),
            (&mut table.cpu_budget_cores, self.cpu_budget_cores),
        ];
        for (slot, flag) in flags {
            if flag.is_some() {
                *slot = flag;
            }
        }
        if self.max_throttle_pct.is_some() {
            table.max_throttle_pct = self.max_throttle_pct;
        }
        if self.allow_postcopy {
            table.allow_postcopy = Some(true);
        }
        Ok(table)
    }

    fn pins(&self) -> anyhow::Result<ferry::policy::Pins> {
        Ok(ferry::policy::Pins {
            codec: match self.compression.as_str() {
                "auto" => None,
                c => Some(c.parse::<ferry_api::Codec>()?),
            },
            throttle_pct: self.throttle_pct,
            disk_write_limit_bytes_per_sec: disk_write_limit(self.disk_write_limit_mbps)?,
            disk_mirror: self.disk_mirror()?,
        })
    }

    fn disk_mirror(&self) -> anyhow::Result<Option<ferry_api::DiskMirror>> {
        Ok(self.disk_mirror.as_deref().map(str::parse).transpose()?)
    }
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run one VM in this process (boot it from a config, or restore a snapshot).
    Vmm {
        /// VM config file (TOML).
        #[arg(
            long,
            conflicts_with_all = ["restore", "incoming"],
            required_unless_present_any = ["restore", "incoming"]
        )]
        config: Option<PathBuf>,
        /// Snapshot folder to restore from.
        #[arg(long, conflicts_with = "incoming")]
        restore: Option<PathBuf>,
        /// Wait for a migration on HOST:PORT; the VM (config, memory, state) comes
        /// from the source. Its disks travel as file names: the images of those
        /// names in a --shared-dir (shared storage), or copies the source sends
        /// (--copy-storage) into --datastore. The port serves one migration at a time
        /// and keeps listening past bad connections and failed migrations.
        #[arg(long, value_name = "HOST:PORT")]
        incoming: Option<String>,
        /// With --incoming: where disks sent along go, in DATASTORE/<vm name>/ with a
        /// config naming them.
        #[arg(long, requires = "incoming")]
        datastore: Option<PathBuf>,
        /// With --incoming: a folder of shared storage where the migrated VM's disk
        /// images are found by file name (repeatable). Symlinks out of it and
        /// anything but regular files are refused.
        #[arg(long, value_name = "DIR", requires = "incoming")]
        shared_dir: Vec<PathBuf>,
        /// With --restore: put the restored disk images here instead of at their
        /// original paths.
        #[arg(long, requires = "restore")]
        disk_dir: Option<PathBuf>,
        /// With --incoming: let in only a source that presents the ticket in FILE
        /// (its content, trimmed), once.
        #[arg(long, value_name = "FILE", requires = "incoming")]
        ticket_file: Option<PathBuf>,
        /// With --incoming: the memory of the VM expected, in MiB. It is allocated
        /// and faulted in while the port waits (as QEMU's -mem-prealloc does), so
        /// the migration's pages land in memory that is already there; a VM of
        /// another size gets fresh memory. Without it, memory faults in as pages
        /// land. An agent passes its incoming VM's size.
        #[arg(long, value_name = "MIB", requires = "incoming", value_parser = clap::value_parser!(u64).range(1..))]
        memory_mib: Option<u64>,
        /// With --incoming: how sources are let in (TLS by default).
        #[command(flatten)]
        tls: TlsArgs,
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
    /// A VM's live signals from the eBPF probes: dirty pages/s, working set, exits,
    /// disk I/O. Needs root.
    Signals {
        /// A Ferry VM's control socket: its dirty rate is sampled (logging on for
        /// --sample-ms of every --interval-ms).
        #[arg(long, conflicts_with = "pid", required_unless_present = "pid")]
        control: Option<PathBuf>,
        /// Any KVM process: the dirty rate shows only while it has dirty logging on.
        #[arg(long)]
        pid: Option<u32>,
        /// Stop after this long (default: until Ctrl-C or the process ends).
        #[arg(long)]
        duration_secs: Option<u64>,
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        interval_ms: u64,
        /// A Ferry VM: dirty logging on for this long of each tick (default: all of
        /// it). Sampling saves the guest nothing measurable: pages logging
        /// write-protected stay so after it stops and fault on their next write anyway.
        #[arg(long, value_parser = clap::value_parser!(u64).range(10..=60_000))]
        sample_ms: Option<u64>,
        /// One JSON object averaged over the run (with every tick) at the end.
        #[arg(long)]
        json: bool,
    },
    /// Move the running VM to a `ferry vmm --incoming` (shared storage, or its disks
    /// sent along with --copy-storage); or, given a VM's name, ask the host's agent to
    /// move it to a peer (`ferry migrate web-1 --to host-b`).
    Migrate {
        /// A VM of the agent's host: the agent moves it (see --agent).
        #[arg(value_name = "VM", conflicts_with_all = ["control", "attach", "resolve", "resume"])]
        vm: Option<String>,
        #[arg(long, required_unless_present = "vm")]
        control: Option<PathBuf>,
        /// Destination HOST:PORT (with --control) or a peer's name (with a VM).
        #[arg(long, value_name = "HOST:PORT|PEER", required_unless_present_any = ["resolve", "resume", "attach"])]
        to: Option<String>,
        /// With a VM: the agent to ask.
        #[command(flatten)]
        api: AgentArgs,
        /// Follow (and steer, with --policy) the migration already under way, as a
        /// `ferry migrate` that went away did; if it has ended, show its report.
        #[arg(long, conflicts_with_all = ["to", "resolve", "resume"])]
        attach: bool,
        /// Settle the last migration's handover in doubt: ask its destination what
        /// happened and tell it whether this side committed.
        #[arg(long)]
        resolve: bool,
        /// Retry a post-copy whose link stayed down past its recovery window.
        #[arg(long, conflicts_with = "resolve")]
        resume: bool,
        /// precopy: rounds of dirty pages, then a short pause. postcopy: the guest
        /// moves at once and its pages follow on demand. hybrid: pre-copy until
        /// `ferry start-postcopy`.
        #[arg(long, default_value_t = Mode::Precopy)]
        mode: Mode,
        /// Post-copy: keep trying to restore a broken link this long.
        #[arg(long, default_value_t = 60)]
        recover_secs: u64,
        /// Post-copy: send every page once first, while the guest runs; only what it
        /// dirties meanwhile is then fetched on demand.
        #[arg(long)]
        precopy_pass: bool,
        /// Send the disks along, for a destination without shared storage (started
        /// with --datastore); pre-copy only.
        #[arg(long)]
        copy_storage: bool,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Declare a silent peer dead after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
        /// Skip comparing the memory digests of both sides after the handover.
        #[arg(long)]
        no_verify: bool,
        /// Present the one-time ticket in FILE to a destination started with
        /// --ticket-file.
        #[arg(long, value_name = "FILE")]
        ticket_file: Option<PathBuf>,
        /// With --control: how the stream reaches the destination (TLS by default).
        #[command(flatten)]
        tls: TlsArgs,
        /// Write the report (JSON) here; the source VMM writes it.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What the policy would do with this VM now, and why: settings, predicted total
    /// time and downtime. Nothing moves.
    Plan {
        #[arg(long)]
        control: PathBuf,
        /// What the link to the destination carries, megabits per second (default:
        /// --bandwidth-mbit; one of the two is needed).
        #[arg(long)]
        link_mbit: Option<f64>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(long)]
        json: bool,
    },
    /// Change the lab guest's page-write rate while it runs (a step, from now on).
    SetWorkload {
        #[arg(long)]
        control: PathBuf,
        /// Pages per second over all vCPUs; 0 = as fast as it can.
        #[arg(long)]
        dirty_pages_per_sec: u64,
    },
    /// Change a running migration's settings.
    SetParams {
        #[arg(long)]
        control: PathBuf,
        /// none, lz4 or zstd:N.
        #[arg(long)]
        compression: Option<Codec>,
        /// Megabits per second; 0 = no cap.
        #[arg(long)]
        bandwidth_mbit: Option<u64>,
        #[arg(long)]
        throttle_pct: Option<u32>,
        #[arg(long)]
        max_downtime_ms: Option<u64>,
        /// Hold the guest's disk writes to this many MB/s while its disks travel (0 =
        /// lift the cap).
        #[arg(long)]
        disk_write_limit_mbps: Option<f64>,
        /// Disks that travel: background or active (each guest write also goes to
        /// the destination before it completes).
        #[arg(long)]
        disk_mirror: Option<DiskMirror>,
    },
    /// Move the running VM's disk images (or one) into another folder (datastore);
    /// the VM's config file is rewritten to name them.
    StorageMigrate {
        #[arg(long)]
        control: PathBuf,
        /// Destination folder.
        #[arg(long)]
        to: PathBuf,
        /// Only this disk (by id).
        #[arg(long)]
        disk: Option<String>,
        /// background: copy, then copy again what the guest wrote; active: guest writes
        /// also go to the copy; auto: background, active if it does not converge.
        #[arg(long, default_value = "auto")]
        mode: StorageMode,
        /// Remove the old images once the copies are verified and in use.
        #[arg(long)]
        remove_source: bool,
        /// Hold the guest's disk writes to this many MB/s while its disks move, so a
        /// background copy can outrun them.
        #[arg(long)]
        throttle_writes_mbps: Option<u64>,
        #[arg(long)]
        report: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Check, offline, every block of the disk images a config names: whole, and no
    /// older than the last write the VMM acknowledged (its write log). Exit status 3
    /// if any block fails.
    DiskCheck {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Switch a running hybrid migration to post-copy.
    StartPostcopy {
        #[arg(long)]
        control: PathBuf,
    },
    /// Stop a running migration; the VM keeps running on the source.
    Cancel {
        /// A migration of the agent's (see --agent), by its id.
        #[arg(value_name = "ID", conflicts_with = "control")]
        id: Option<String>,
        /// The VMM whose migration to stop.
        #[arg(long, required_unless_present = "id")]
        control: Option<PathBuf>,
        #[command(flatten)]
        api: AgentArgs,
    },
    /// List the migrations an agent drives or drove since it started.
    Migrations {
        #[command(flatten)]
        api: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Run the host agent: keep this host's VMs (one `ferry vmm` each, started from
    /// the VM folder, or adopted if already running) and serve the HTTP API
    /// (docs/API.md). Stops on SIGTERM or SIGINT; the VMs keep running.
    Agent {
        /// The agent's config (TOML; see docs/API.md).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log lines for people (text) or for collectors (json).
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        log_format: String,
    },
    /// List the VMs an agent holds, with their state and the guest's heartbeats.
    Vms {
        #[command(flatten)]
        api: AgentArgs,
        #[arg(long)]
        json: bool,
    },
    /// Stop the VM and its process.
    Quit {
        #[arg(long)]
        control: PathBuf,
        /// Stop the VM even while a migration moves it (refused otherwise: the VM
        /// would run nowhere if the destination does not have it yet).
        #[arg(long)]
        force: bool,
    },
}

/// A ticket file's content, trimmed; empty is an error.
fn read_ticket(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the ticket file {}", path.display()))?;
    let t = text.trim();
    anyhow::ensure!(!t.is_empty(), "the ticket file {} is empty", path.display());
    Ok(t.to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vmm {
            config,
            restore,
            disk_dir,
            incoming,
            datastore,
            shared_dir,
            ticket_file,
            memory_mib,
            tls,
            control,
            paused,
        } => (|| {
            let ticket = ticket_file.as_deref().map(read_ticket).transpose()?;
            anyhow::ensure!(
                incoming.is_some() || !tls.given(),
                "--tls-cert, --tls-key, --tls-ca and --insecure apply to --incoming (a \
                 source is given them with each `ferry migrate`)"
            );
            let incoming = match incoming {
                Some(addr) => Some(cli::vmm::Incoming {
                    addr,
                    place: migration::door::Placement {
                        datastore,
                        shared: shared_dir,
                    },
                    ticket,
                    transport: tls.transport()?,
                    memory_mib,
                }),
                None => None,
            };
            cli::vmm::run(
                cli::vmm::Source::new(config, restore, disk_dir, incoming),
                &control,
                paused,
            )
        })(),
        Command::Agent { config, log_format } => cli::agent::serve(&config, &log_format),
        Command::Vms { api, json } => cli::agent::vms(&api.endpoint(), json),
        Command::Status { control, json } => cli::client::status(&control, json),
        Command::Pause { control } => cli::client::change_state(&control, &Request::Pause {}),
        Command::Resume { control } => cli::client::change_state(&control, &Request::Resume {}),
        Command::Quit { control, force } => {
            cli::client::change_state(&control, &Request::Quit { force })
        }
        Command::Cancel {
            control: Some(control),
            ..
        } => cli::client::print_answer::<ferry_api::Cancelling>(&control, &Request::Cancel {}),
        Command::Cancel { id, api, .. } => {
            cli::agent::cancel(&api.endpoint(), &id.unwrap_or_default())
        }
        Command::Migrations { api, json } => cli::agent::migrations(&api.endpoint(), json),
        Command::StorageMigrate {
            control,
            to,
            disk,
            mode,
            remove_source,
            throttle_writes_mbps,
            report,
            json,
        } => (|| {
            cli::client::storage_migrate(
                &control,
                Request::StorageMigrate {
                    to,
                    disk,
                    mode: Some(mode),
                    remove_source,
                    throttle_writes_bytes_per_sec: megabytes(
                        throttle_writes_mbps,
                        "--throttle-writes-mbps",
                    )?,
                    report,
                },
                json,
            )
        })(),
        Command::DiskCheck { config, json } => disk_check(&config, json),
        Command::StartPostcopy { control } => cli::client::print_answer::<
            ferry_api::PostcopyRequested,
        >(&control, &Request::StartPostcopy {}),
        Command::Migrate {
            vm: Some(vm),
            to,
            api,
            policy,
            copy_storage,
            json,
            ..
        } => (|| {
            let limits = policy.limits_table()?;
            let mut req = serde_json::json!({
                "vm": vm,
                "destination": to.unwrap_or_default(),
                "policy": policy.policy,
            });
            if limits != ferry::policy::LimitsTable::default() {
                req["limits"] = serde_json::to_value(&limits)?;
            }
            if copy_storage {
                req["copy_storage"] = true.into();
            }
            cli::agent::migrate(&api.endpoint(), &req, json)
        })(),
        Command::Migrate { control: None, .. } => {
            Err(anyhow::anyhow!("--control or a VM's name is needed"))
        }
        Command::Migrate {
            control: Some(control),
            resolve: true,
            ..
        } => cli::client::print_answer::<ferry_api::Resolution>(&control, &Request::Resolve {}),
        Command::Migrate {
            control: Some(control),
            resume: true,
            ..
        } => {
            cli::client::print_answer::<ferry_api::Resuming>(&control, &Request::ResumeMigration {})
        }
        Command::Migrate {
            control: Some(control),
            mode,
            recover_secs,
            precopy_pass,
            copy_storage,
            resolve: false,
            resume: false,
            to,
            attach,
            policy,
            timeout_secs,
            no_verify,
            ticket_file,
            tls,
            report,
            json,
            vm: None,
            ..
        } => (|| {
            let limits = policy.limits()?;
            let pins = policy.pins()?;
            let (codec, disk_write_limit) = (pins.codec, pins.disk_write_limit_bytes_per_sec);
            let chosen = ferry::policy::by_name(&policy.policy, pins, &limits)
                .map_err(anyhow::Error::msg)?;
            // Post-copy allowed: hybrid, so the policy can switch when it decides.
            let mode = if limits.allow_postcopy && mode == Mode::Precopy {
                Mode::Hybrid
            } else {
                mode
            };
            let req = ferry_api::Migrate {
                to: to.unwrap_or_default(),
                settings: ferry_api::SettingsChange {
                    codec: Some(codec.unwrap_or_default()),
                    max_downtime_ms: Some(ferry::policy::whole_ms(limits.max_downtime_ms)),
                    bandwidth_bytes_per_sec: Some(limits.bandwidth_bytes_per_sec().unwrap_or(0)),
                    throttle_pct: Some(policy.throttle_pct.unwrap_or(0)),
                    disk_write_limit_bytes_per_sec: disk_write_limit,
                    disk_mirror: policy.disk_mirror()?,
                    switchover: None,
                },
                max_total_secs: limits.max_total_secs.map(|s| s.ceil() as u64),
                timeout_secs: Some(timeout_secs),
                report: None,
                no_verify,
                mode: Some(mode),
                recover_secs: Some(recover_secs),
                precopy_pass,
                copy_storage,
                reasons: Default::default(),
                ticket: ticket_file.as_deref().map(read_ticket).transpose()?,
                // A caller's trace (OpenTelemetry's TRACEPARENT variable) reaches both
                // VMMs' logs.
                traceparent: std::env::var("TRACEPARENT")
                    .ok()
                    .filter(|t| ferry_api::trace::trace_ids(t).is_some()),
                tls: tls.files()?,
                insecure: tls.insecure,
            };
            cli::migrate::run(
                &control,
                (!attach).then_some(req),
                report.as_deref(),
                json,
                (chosen, limits),
            )
        })(),
        Command::Plan {
            control,
            link_mbit,
            policy,
            json,
        } => (|| {
            let limits = policy.limits()?;
            let chosen = ferry::policy::by_name(&policy.policy, policy.pins()?, &limits)
                .map_err(anyhow::Error::msg)?;
            let Some(chosen) = chosen else {
                anyhow::bail!("the static policy makes no plan: it applies the flags as given");
            };
            cli::plan::run(&control, chosen, &limits, link_mbit, json)
        })(),
        Command::SetWorkload {
            control,
            dirty_pages_per_sec,
        } => cli::client::print_answer::<ferry_api::WorkloadSet>(
            &control,
            &Request::SetWorkload {
                dirty_pages_per_sec,
            },
        ),
        Command::SetParams {
            control,
            compression,
            bandwidth_mbit,
            throttle_pct,
            max_downtime_ms,
            disk_write_limit_mbps,
            disk_mirror,
        } => (|| {
            cli::client::print_answer::<ferry_api::Settings>(
                &control,
                &Request::SetParams {
                    settings: ferry_api::SettingsChange {
                        codec: compression,
                        bandwidth_bytes_per_sec: bandwidth_mbit.map(megabits),
                        throttle_pct,
                        max_downtime_ms,
                        disk_write_limit_bytes_per_sec: disk_write_limit(disk_write_limit_mbps)?,
                        disk_mirror,
                        switchover: None,
                    },
                    reasons: Default::default(),
                },
            )
        })(),
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
        Command::Signals {
            control,
            pid,
            duration_secs,
            interval_ms,
            sample_ms,
            json,
        } => cli::signals::run(cli::signals::Options {
            control,
            pid,
            duration_secs,
            interval_ms,
            sample_ms: sample_ms.unwrap_or(interval_ms).min(interval_ms),
            json,
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out causes whose text the message
/// already carries (most of Ferry's errors quote their cause).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', "; ")
}

fn disk_check(config: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let r = ferry::vmm::disk_check::check(config)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} disks: {} blocks checked ({} written, {} acknowledged writes in the logs), {} errors",
            r.disks, r.blocks_checked, r.blocks_written, r.acknowledged_writes, r.errors
        );
        for p in &r.problems {
            println!("  disk {} block {}: {}", p.disk, p.block, p.what);
        }
    }
    Ok(if r.errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// `--disk-write-limit-mbps` (the operator's MB/s) in the settings' bytes per second;
/// 0 is none.
fn disk_write_limit(mbps: Option<f64>) -> anyhow::Result<Option<u64>> {
    match mbps {
        Some(m) if !(m == 0.0 || (m >= 1.0 && m.is_finite())) => {
            anyhow::bail!("--disk-write-limit-mbps {m}: must be 0 (none) or at least 1")
        }
        m => Ok(m.map(|m| (m * 1e6).round() as u64)),
    }
}

/// `--bandwidth-mbit` (the operator's Mbit/s) in the settings' bytes per second.
fn megabits(mbit: u64) -> u64 {
    mbit.saturating_mul(1_000_000) / 8
}

/// A whole-MB/s flag in bytes per second; 0 is refused (the cap would stop every
/// write).
fn megabytes(mbps: Option<u64>, flag: &str) -> anyhow::Result<Option<u64>> {
    match mbps {
        Some(0) => anyhow::bail!("{flag} 0: must be at least 1 (MB/s)"),
        m => Ok(m.map(|m| m.saturating_mul(1_000_000))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_units_become_bytes_per_second_once() {
        assert_eq!(megabits(800), 100_000_000);
        assert_eq!(megabits(0), 0);
        assert_eq!(megabytes(Some(5), "--x").unwrap(), Some(5_000_000));
        assert_eq!(megabytes(None, "--x").unwrap(), None);
        assert!(
            megabytes(Some(0), "--x")
                .unwrap_err()
                .to_string()
                .contains("--x 0")
        );
        assert_eq!(disk_write_limit(Some(6.5)).unwrap(), Some(6_500_000));
        assert_eq!(disk_write_limit(Some(0.0)).unwrap(), Some(0));
        assert_eq!(disk_write_limit(None).unwrap(), None);
        for bad in [0.5, -1.0, f64::NAN, f64::INFINITY] {
            assert!(disk_write_limit(Some(bad)).is_err(), "{bad}");
        }
    }
}
