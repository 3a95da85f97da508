//! wg-cni: a CNI plugin whose pods get exactly one link, a WireGuard interface.
//! With CNI_COMMAND set it speaks CNI on stdin/stdout; without it, it is a CLI for people.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wg_cni::{cni, commands, logging, show, uninstall};

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
        /// Where the runtime's conflists are (for each network's `keyRotation`).
        #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
    },
    /// Give a running pod link a fresh key without restarting the pod: the private key is made
    /// here from the OS RNG and handed to the link only; this node's links move to the new key
    /// at once, other nodes' through their agents. Prints the old and new public keys.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["container", "all"])))]
    Rotate {
        /// The key store root (the conflist's "store").
        #[arg(long, value_name = "DIR", default_value = cni::config::DEFAULT_STORE)]
        store: PathBuf,
        /// The network (its conflist, in --cni-conf-dir, says how its pods peer).
        #[arg(long)]
        network: String,
        /// The node name records are filed under (the conflist's "nodeName"; default: host name).
        #[arg(long)]
        node: Option<String>,
        /// The attachment's container ID (as `wg-cni show` lists it).
        #[arg(long, requires = "ifname")]
        container: Option<String>,
        /// The attachment's interface name in the pod.
        #[arg(long)]
        ifname: Option<String>,
        /// Every ready attachment of the network on this node, one after the other.
        #[arg(long, conflicts_with_all = ["container", "ifname"])]
        all: bool,
        /// Where the runtime's conflists are.
        #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
    },
    /// Copy this binary, and wg-cni-wgd where it sits beside it, into the host's CNI bin dir:
    /// a temp file in that dir, fsynced, renamed over the old one. Identical ones stay as they
    /// are, so running it again changes nothing.
    Install {
        /// The container runtime's CNI bin dir (host-local must be there too).
        #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
    },
    /// Remove wg-cni from this host (run it after stopping the agent): every network's node
    /// gateway (link, daemon, policy rules, routing table, iptables rules), the agent's
    /// readiness marker, the store's conflists; once no pod remains here, the binaries and the
    /// runtime dir. Pods' links, the store, ip_forward and etcd are left (see the output).
    Uninstall {
        /// The key store root (the conflist's "store").
        #[arg(long, value_name = "DIR", default_value = cni::config::DEFAULT_STORE)]
        store: PathBuf,
        /// Where the runtime's conflists are: those running wg-cni on --store are removed.
        #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The CNI bin dir `install` copied the binaries to.
        #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// wg-cni's runtime dir (port ledger, IPAM version cache).
        #[arg(long, value_name = "DIR", default_value = "/run/wg-cni")]
        run_dir: PathBuf,
        /// Only this network (the binaries and the runtime dir then stay).
        #[arg(long)]
        network: Option<String>,
        /// The node name records are filed under (the conflist's "nodeName"; default: host name).
        #[arg(long)]
        node: Option<String>,
    },
    /// Run the node agent (the `wg-cni-agent` binary beside this one; `wg-cni agent --help`).
    #[command(disable_help_flag = true)]
    Agent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// `wg-cni agent ARGS` runs `wg-cni-agent ARGS` from this binary's directory (it replaces this
/// process): the plugin binary stays free of the agent's code.
fn exec_agent(args: Vec<std::ffi::OsString>) -> cni::Result<()> {
    use std::os::unix::process::CommandExt;
    let me = std::env::current_exe().map_err(|e| cni::Error::Io {
        context: "finding this binary's directory".into(),
        source: e,
    })?;
    let agent = me.with_file_name("wg-cni-agent");
    let error = std::process::Command::new(&agent).args(args).exec();
    Err(cni::Error::Io {
        context: format!("running {} (install it beside wg-cni)", agent.display()),
        source: error,
    })
}

struct RotateArgs {
    store: PathBuf,
    network: String,
    node: Option<String>,
    /// (container ID, ifname); `None`: every attachment of the node.
    attachment: Option<(String, String)>,
    cni_conf_dir: PathBuf,
}

/// `wg-cni rotate`: the network's conflist says how its pods peer; one line per attachment
/// with its old and new public keys (public keys only).
fn rotate(args: RotateArgs) -> cni::Result<()> {
    let networks = wg_cni::agent::config::read_networks(&args.cni_conf_dir, &args.store)
        .map_err(|e| cni::Error::config("--cni-conf-dir", format!("{e:#}")))?;
    let conf = networks
        .into_iter()
        .find(|n| n.name == args.network)
        .map(|n| n.conf)
        .ok_or_else(|| {
            cni::Error::config(
                "--network",
                format!(
                    "no conflist in {} names network \"{}\" with store {}",
                    args.cni_conf_dir.display(),
                    args.network,
                    args.store.display()
                ),
            )
        })?;
    let name = wg_cni::host::node_name(args.node.as_deref().or(conf.node_name.as_deref()))?;
    let boot_id = wg_cni::host::boot_id()?;
    let host = wg_cni::netns::Netns::host()?;
    let node = wg_cni::rotate::Node {
        name: &name,
        boot_id: &boot_id,
        host: &host,
    };
    let outcomes = match &args.attachment {
        Some((container, ifname)) => {
            let rotated = wg_cni::rotate::rotate(&node, &conf, container, ifname);
            vec![(container.clone(), ifname.clone(), rotated)]
        }
        None => wg_cni::rotate::rotate_all(&node, &conf),
    };
    let mut failed = None;
    for (container, ifname, outcome) in outcomes {
        match outcome {
            Ok(r) => println!(
                "rotated {container}/{ifname}: {} -> {} ({} ms)",
                r.old_key,
                r.new_key,
                r.took.as_millis()
            ),
            Err(e) => {
                eprintln!("wg-cni: {container}/{ifname} not rotated: {e}");
                failed = Some(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

fn install(bin_dir: &std::path::Path) -> cni::Result<()> {
    let me = std::env::current_exe().map_err(|e| cni::Error::Io {
        context: "finding this binary".into(),
        source: e,
    })?;
    let from = me.parent().unwrap_or(std::path::Path::new("/"));
    for (name, outcome) in wg_cni::install::install(from, bin_dir)? {
        let target = bin_dir.join(&name);
        match outcome {
            wg_cni::install::Outcome::Installed => println!("installed {}", target.display()),
            wg_cni::install::Outcome::UpToDate => println!("{} is up to date", target.display()),
            wg_cni::install::Outcome::NotFound => println!(
                "{name} is not beside {}: not installed (userspace links then need wireguard-go, or the kernel backend)",
                me.display()
            ),
        }
    }
    Ok(())
}

fn uninstall(mut options: uninstall::Options) -> cni::Result<()> {
    let configured = Some(options.node.as_str()).filter(|n| !n.is_empty());
    options.node = wg_cni::host::node_name(configured)?;
    for (flag, name) in [
        ("--node", Some(&options.node)),
        ("--network", options.network.as_ref()),
    ] {
        if let Some(name) = name.filter(|n| !wg_cni::agent::keys::is_node_name(n)) {
            return Err(cni::Error::config(
                flag,
                format!("\"{name}\" {}", cni::IDENTIFIER_RULE),
            ));
        }
    }
    let host = wg_cni::netns::Netns::host()?;
    let report = uninstall::run(&host, &options)?;
    if report.removed.is_empty() {
        println!("nothing of wg-cni left to remove on node {}", options.node);
    }
    for line in &report.removed {
        println!("removed {line}");
    }
    for line in &report.kept {
        println!("kept {line}");
    }
    println!(
        "left as they are: ip_forward (other software may rely on it), the store {} (pod records, the agent's id)",
        options.store.display()
    );
    println!(
        "etcd: once this node is gone for good, run `wg-cni-agent forget-node {} --etcd-endpoints URL` with administrator credentials",
        options.node
    );
    Ok(())
}

fn main() -> ExitCode {
    logging::init();
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
            cni_conf_dir,
        } => show::run(
            &store,
            node.as_deref(),
            network.as_deref(),
            json,
            &cni_conf_dir,
        ),
        CliCommand::Rotate {
            store,
            network,
            node,
            container,
            ifname,
            all,
            cni_conf_dir,
        } => rotate(RotateArgs {
            store,
            network,
            node,
            attachment: container.zip(ifname).filter(|_| !all),
            cni_conf_dir,
        }),
        CliCommand::Install { cni_bin_dir } => install(&cni_bin_dir),
        CliCommand::Uninstall {
            store,
            cni_conf_dir,
            cni_bin_dir,
            run_dir,
            network,
            node,
        } => uninstall(uninstall::Options {
            store,
            cni_conf_dir,
            cni_bin_dir,
            run_dir,
            network,
            node: node.unwrap_or_default(),
        }),
        CliCommand::Agent { args } => exec_agent(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wg-cni: {e}");
            ExitCode::FAILURE
        }
    }
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
                write_whole(&mut out, &value.to_string());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::debug!(code = error.code(), "command failed");
            let body = cni::error::to_json(&error, &commands::error_version(&stdin));
            write_whole(&mut out, &body.to_string());
            ExitCode::FAILURE
        }
    }
}

/// The answer in one write: `writeln!` on an unbuffered file issues a write per JSON token
/// (about a hundred for an ADD result), each a syscall, which a slow VM makes milliseconds.
fn write_whole(out: &mut File, json: &str) {
    let _ = out.write_all(format!("{json}\n").as_bytes());
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
