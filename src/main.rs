//! wg-cni: a CNI plugin whose pods get exactly one link, a WireGuard interface.
//! With CNI_COMMAND set it speaks CNI on stdin/stdout; without it, it is a CLI for people.

mod agent;
mod cni;
mod commands;
mod failpoint;
mod gateway;
mod host;
mod ipam;
mod keys;
mod lease;
mod link;
mod mesh;
mod nat;
mod netns;
mod ports;
mod reconcile;
mod show;
mod store;
mod wireguard;

#[cfg(test)]
mod fuzz_tests;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "wg-cni",
    version,
    about = "CNI plugin: every pod gets exactly one network link, a WireGuard interface",
    long_about = "CNI plugin: every pod gets exactly one network link, a WireGuard interface.\n\n\
        Container runtimes run this binary with CNI_COMMAND set (ADD, DEL, CHECK, GC, STATUS, VERSION) \
        and the network configuration on stdin. Without CNI_COMMAND it offers the commands below."
)]
struct Cli {
    #[command(subcommand)]
    command: CliCommand,
}

#[derive(Subcommand)]
enum CliCommand {
    /// List this node's attachments per network, with peers, handshakes and transfer.
    Show {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The key store root (the conflist's "store").
        #[arg(long, default_value = cni::config::DEFAULT_STORE)]
        store: PathBuf,
        /// Only this network.
        #[arg(long)]
        network: Option<String>,
        /// The node name records are filed under (the conflist's "nodeName"; default: host name).
        #[arg(long)]
        node: Option<String>,
    },
    /// Run the node agent: sync this node's records with every other node's through etcd.
    Agent(AgentArgs),
}

#[derive(clap::Args)]
struct AgentArgs {
    /// etcd client URLs, comma-separated (http:// or https://).
    #[arg(
        long,
        value_name = "URL[,URL…]",
        value_delimiter = ',',
        required = true
    )]
    etcd_endpoints: Vec<String>,
    /// The key store root (the conflist's "store"); only networks with this store are served.
    #[arg(long, value_name = "DIR", default_value = cni::config::DEFAULT_STORE)]
    store: PathBuf,
    /// This node's name (the conflist's "nodeName"; default: host name).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// Where the runtime's conflists are.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// CA certificate (PEM) to verify etcd's server certificate; enables TLS.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-cert auth (with --etcd-ca and --etcd-key).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user name (role-based access: this node's own keys only).
    #[arg(long, value_name = "NAME")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Liveness lease TTL in seconds (kept alive every TTL/3).
    #[arg(long, value_name = "SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    lease_ttl: u64,
    /// How long a node whose lease lapsed keeps its records mirrored, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    grace_period: u64,
    /// Full rescan of this node's records and reconcile, every this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    resync_interval: u64,
    /// Where /healthz and /readyz answer.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9765")]
    health_listen: std::net::SocketAddr,
}

fn run_agent(args: AgentArgs) -> cni::Result<()> {
    use std::time::Duration;
    let node = host::node_name(args.node.as_deref())?;
    if !agent::keys::is_node_name(&node) {
        return Err(cni::Error::config(
            "--node",
            format!("\"{node}\" {}", cni::IDENTIFIER_RULE),
        ));
    }
    let settings = agent::Settings {
        etcd_endpoints: args.etcd_endpoints,
        store: args.store,
        node,
        cni_conf_dir: args.cni_conf_dir,
        etcd_ca: args.etcd_ca,
        etcd_cert: args.etcd_cert,
        etcd_key: args.etcd_key,
        etcd_user: args.etcd_user,
        etcd_password_file: args.etcd_password_file,
        lease_ttl: Duration::from_secs(args.lease_ttl),
        grace_period: Duration::from_secs(args.grace_period),
        resync_interval: Duration::from_secs(args.resync_interval),
        health_listen: args.health_listen,
    };
    let status = std::sync::Arc::new(agent::AgentStatus::default());
    let links = std::sync::Arc::new(agent::links::LinkSync::new(&settings)?);
    agent::run(settings, links, status).map_err(|e| cni::Error::Io {
        context: format!("{e:#}"),
        source: std::io::Error::other("agent stopped"),
    })
}

fn main() -> ExitCode {
    init_logging();
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni_main();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        CliCommand::Show {
            json,
            store,
            network,
            node,
        } => show::run(&store, node.as_deref(), network.as_deref(), json),
        CliCommand::Agent(args) => run_agent(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wg-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (runtimes keep it), filtered by WG_CNI_LOG (default: warnings).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WG_CNI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn cni_main() -> ExitCode {
    let mut out = reserve_stdout();
    let mut stdin = Vec::new();
    let read = std::io::stdin()
        .take(cni::config::MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut stdin);
    let outcome = match read {
        Ok(_) => cni::CniEnv::from_process().and_then(|env| commands::run(&env, &stdin)),
        Err(e) => Err(cni::Error::Io {
            context: "reading the network configuration from stdin".into(),
            source: e,
        }),
    };
    match outcome {
        Ok(output) => {
            if let Some(value) = output {
                let _ = writeln!(out, "{value}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::debug!(code = error.code(), "command failed");
            let body = cni::error::to_json(&error, &commands::error_version(&stdin));
            let _ = writeln!(out, "{body}");
            ExitCode::FAILURE
        }
    }
}

/// Runtimes parse our stdout as the result, so nothing else may ever write there. Keep a
/// private close-on-exec copy of stdout for the result and point fd 1 at stderr: a stray
/// print from any library lands in the log, and children never inherit the result pipe.
fn reserve_stdout() -> File {
    use nix::fcntl::{FcntlArg, fcntl};
    let stdout = std::io::stdout();
    let copy = fcntl(stdout.as_fd(), FcntlArg::F_DUPFD_CLOEXEC(3));
    match copy {
        Ok(fd) => {
            // SAFETY: fd is a fresh descriptor we own.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = nix::unistd::dup2_stdout(std::io::stderr().as_fd());
            File::from(owned)
        }
        // No usable stdout at all: write the result to stderr rather than nowhere.
        Err(_) => File::from(
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .expect("stderr"),
        ),
    }
}
