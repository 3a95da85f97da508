//! `wg-cni-agent` (also reached as `wg-cni agent`): the agent's command line. A binary of its
//! own, so that the CNI plugin's binary links none of the agent's weight (tokio's multi-thread
//! runtime, the etcd client, inotify): every pod start execs the plugin.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::{agent, cni, host};

#[derive(Parser)]
#[command(
    name = "wg-cni agent",
    version,
    about = "wg-cni's node agent: sync this node's records with every other node's through etcd"
)]
pub struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    /// etcd client URLs, comma-separated (http:// or https://).
    #[arg(long, value_name = "URL[,URL…]", value_delimiter = ',', global = true)]
    etcd_endpoints: Vec<String>,
    /// The key store root (the conflist's "store"); only networks with this store are served.
    #[arg(long, value_name = "DIR", default_value = cni::config::DEFAULT_STORE)]
    store: PathBuf,
    /// This node's name (the conflist's "nodeName"; default: host name). In Kubernetes, the
    /// downward API's spec.nodeName in NODE_NAME.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    node: Option<String>,
    /// Where the runtime's conflists are.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// CA certificate (PEM) to verify etcd's server certificate; enables TLS.
    #[arg(long, value_name = "FILE", global = true)]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-cert auth (with --etcd-ca and --etcd-key).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_key", "etcd_ca"], global = true)]
    etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert", global = true)]
    etcd_key: Option<PathBuf>,
    /// etcd user name (role-based access: this node's own keys only).
    #[arg(long, value_name = "NAME", global = true)]
    etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, value_name = "FILE", requires = "etcd_user", global = true)]
    etcd_password_file: Option<PathBuf>,
    /// Liveness lease TTL in seconds (kept alive every TTL/3).
    #[arg(long, value_name = "SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    lease_ttl: u64,
    /// How long a node whose lease lapsed keeps its records mirrored, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    grace_period: u64,
    /// A leased subnet's claim lapses this many seconds after its agent stopped renewing it
    /// (its subnet is then free for another node), as flannel's 24 h subnet leases.
    #[arg(long, value_name = "SECONDS", default_value_t = 86400, value_parser = clap::value_parser!(u64).range(2..))]
    subnet_lease_ttl: u64,
    /// Full rescan of this node's records and reconcile, every this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    resync_interval: u64,
    /// Where /healthz and /readyz answer.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9765")]
    health_listen: std::net::SocketAddr,
    /// Where /metrics answers (Prometheus text format), or "off". Keep it on 127.0.0.1 or
    /// behind a policy: pods reach their node's addresses, and the series name every pod and
    /// public key of the node. The same address as --health-listen: one listener serves both.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "127.0.0.1:9766", value_parser = parse_listen)]
    metrics_listen: Listen,
    /// Also export per-peer series (wireguard_*_bytes_total, wireguard_latest_handshake_seconds):
    /// one per peer of every link, which grows with pods² in a mesh.
    #[arg(long)]
    metrics_per_peer: bool,
    /// A cgroup v2 directory the node gateway's userspace daemons join before they run, so
    /// that stopping the agent's container (an upgrade) leaves them running. In a DaemonSet
    /// with host PID: /proc/1/root/sys/fs/cgroup (the host's root cgroup). On a cgroup v1
    /// host, or one that denies the path, only a warning: daemons stay in the agent's cgroup.
    #[arg(long, value_name = "DIR")]
    daemon_cgroup: Option<PathBuf>,
    /// A conflist template (one wg-cni plugin entry): its network is served from the start,
    /// and the conflist rendered for this node is written to --conflist-out once the network
    /// is ready (subnet claimed, lease held, first sync done).
    #[arg(long, value_name = "FILE")]
    conflist_template: Option<PathBuf>,
    /// Where the rendered conflist goes (default: 10-wg-cni.conflist in --cni-conf-dir).
    #[arg(long, value_name = "FILE", requires = "conflist_template")]
    conflist_out: Option<PathBuf>,
    /// This node's address other nodes reach it at, rendered as the template's "endpoint"
    /// (in Kubernetes: status.hostIP in HOST_IP). Without it the template's value stays
    /// (none: the plugin takes the default route's source address). Used only with a template.
    #[arg(long, value_name = "IP", env = "HOST_IP")]
    endpoint: Option<std::net::IpAddr>,
    /// Rendered as the template's "clusterRange" (one CIDR, or one per family).
    #[arg(
        long,
        value_name = "CIDR[,CIDR]",
        value_delimiter = ',',
        requires = "conflist_template"
    )]
    cluster_range: Option<Vec<ipnetwork::IpNetwork>>,
    /// Rendered as the template's "serviceRange" (one CIDR, or one per family).
    #[arg(
        long,
        value_name = "CIDR[,CIDR]",
        value_delimiter = ',',
        requires = "conflist_template"
    )]
    service_range: Option<Vec<ipnetwork::IpNetwork>>,
}

#[derive(clap::Subcommand)]
enum AgentCommand {
    /// Delete a node that is gone for good from etcd: its node key, heartbeat, address claims,
    /// records and subnet claims, in every network (or one). Needs credentials that may write
    /// other nodes' keys (an administrator's, not a node's). Every agent then drops the node's
    /// records from its mirror, and its subnet and addresses are free for other nodes.
    ForgetNode {
        /// The node's name, as its agent's --node.
        name: String,
        /// Only this network (default: every network the node appears in).
        #[arg(long, value_name = "NETWORK")]
        network: Option<String>,
        /// Forget it even though its node key says it is alive.
        #[arg(long)]
        force: bool,
    },
    /// Create the etcd role and user of a node (run once per node, with an administrator's
    /// credentials or before etcd's auth is enabled): the node may then write only its own
    /// keys of the given networks and read the rest. Running it again adds what is missing.
    GrantNode {
        /// The node's name, as its agent's --node (also the role's and the user's name).
        name: String,
        /// A network the node serves (repeat for each).
        #[arg(long = "network", value_name = "NETWORK", required = true)]
        networks: Vec<String>,
        /// The user's password, read from this file (else the user has none and logs in with
        /// a TLS client certificate whose common name is NAME).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
}

pub fn run(args: AgentArgs) -> cni::Result<()> {
    use std::time::Duration;
    // Global flags (they may follow a subcommand) cannot be `required` in clap.
    if args.etcd_endpoints.is_empty() {
        return Err(cni::Error::config(
            "--etcd-endpoints",
            "is required: the etcd client URLs, comma-separated",
        ));
    }
    if let Some(AgentCommand::ForgetNode {
        name,
        network,
        force,
    }) = &args.command
    {
        return forget_node(&args, name, network.as_deref(), *force);
    }
    if let Some(AgentCommand::GrantNode {
        name,
        networks,
        password_file,
    }) = &args.command
    {
        return grant_node(&args, name, networks, password_file.as_deref());
    }
    let node = host::node_name(args.node.as_deref())?;
    if !agent::keys::is_node_name(&node) {
        return Err(cni::Error::config(
            "--node",
            format!("\"{node}\" {}", cni::IDENTIFIER_RULE),
        ));
    }
    if let Some(dir) = &args.daemon_cgroup {
        crate::wireguard::cgroup::move_daemons_to(dir)?;
    }
    let template = args
        .conflist_template
        .clone()
        .map(|path| agent::template::Template {
            path,
            out: args
                .conflist_out
                .clone()
                .unwrap_or_else(|| args.cni_conf_dir.join(DEFAULT_CONFLIST)),
            values: agent::template::Values {
                node: node.clone(),
                endpoint: args.endpoint,
                cluster_range: args.cluster_range.as_ref().map(|r| strings(r)),
                service_range: args.service_range.as_ref().map(|r| strings(r)),
            },
        });
    if let Some(template) = &template {
        // A template that does not render is an operator's mistake: say so and stop, rather
        // than run an agent that never makes the node ready.
        template
            .render(&args.store)
            .map_err(|e| cni::Error::Decode {
                context: "cannot serve the template's network".into(),
                reason: format!("{e:#}"),
            })?;
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
        subnet_lease_ttl: Duration::from_secs(args.subnet_lease_ttl),
        resync_interval: Duration::from_secs(args.resync_interval),
        health_listen: args.health_listen,
        metrics_listen: args.metrics_listen.0,
        metrics_per_peer: args.metrics_per_peer,
        template,
    };
    // One agent per store; held until the process ends (uninstall tests it).
    let _presence = crate::agent_presence::hold(&settings.store)?;
    let status = std::sync::Arc::new(agent::AgentStatus::default());
    let links = std::sync::Arc::new(agent::links::LinkSync::new(&settings)?);
    agent::run(settings, links, status).map_err(|e| cni::Error::Io {
        context: format!("{e:#}"),
        source: std::io::Error::other("agent stopped"),
    })
}

/// A listen address, or none ("off").
#[derive(Debug, Clone, Copy)]
struct Listen(Option<std::net::SocketAddr>);

fn parse_listen(value: &str) -> Result<Listen, String> {
    match value {
        "off" => Ok(Listen(None)),
        _ => value
            .parse()
            .map(|addr| Listen(Some(addr)))
            .map_err(|e| format!("{e}: give ADDR:PORT (e.g. 127.0.0.1:9766) or off")),
    }
}

/// The conflist the agent writes from its template unless --conflist-out says otherwise.
const DEFAULT_CONFLIST: &str = "10-wg-cni.conflist";

fn strings(ranges: &[ipnetwork::IpNetwork]) -> Vec<String> {
    ranges.iter().map(ToString::to_string).collect()
}

fn forget_node(
    args: &AgentArgs,
    name: &str,
    network: Option<&str>,
    force: bool,
) -> cni::Result<()> {
    if !agent::keys::is_node_name(name) {
        return Err(cni::Error::config(
            "NAME",
            format!("\"{name}\" {}", cni::IDENTIFIER_RULE),
        ));
    }
    let forgotten =
        agent::forget::forget_node(&connection(args), name, network, force).map_err(|e| {
            cni::Error::Io {
                context: format!("{e:#}"),
                source: std::io::Error::other("forget-node failed"),
            }
        })?;
    for (network, keys) in forgotten {
        println!("network {network}: deleted {keys} keys of node {name}");
    }
    Ok(())
}

fn grant_node(
    args: &AgentArgs,
    name: &str,
    networks: &[String],
    password_file: Option<&std::path::Path>,
) -> cni::Result<()> {
    if !agent::keys::is_node_name(name) {
        return Err(cni::Error::config(
            "NAME",
            format!("\"{name}\" {}", cni::IDENTIFIER_RULE),
        ));
    }
    if let Some(bad) = networks.iter().find(|n| !agent::keys::is_node_name(n)) {
        return Err(cni::Error::config(
            "--network",
            format!("\"{bad}\" {}", cni::IDENTIFIER_RULE),
        ));
    }
    let login = match password_file {
        Some(path) => {
            let text =
                zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                    cni::Error::Io {
                        context: format!("reading --password-file {}", path.display()),
                        source,
                    }
                })?);
            let password = text.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                return Err(cni::Error::config(
                    "--password-file",
                    format!("{} is empty", path.display()),
                ));
            }
            agent::grant::Login::Password(zeroize::Zeroizing::new(password.to_string()))
        }
        None => agent::grant::Login::Certificate,
    };
    let certificate = matches!(login, agent::grant::Login::Certificate);
    let granted =
        agent::grant::grant_node(&connection(args), name, networks, login).map_err(|e| {
            cni::Error::Io {
                context: format!("{e:#}"),
                source: std::io::Error::other("grant-node failed"),
            }
        })?;
    let made = |created: bool| if created { "created" } else { "already there" };
    println!("role {name} ({}) may write:", made(granted.role_created));
    for prefix in &granted.writes {
        println!("  {prefix}");
    }
    println!("and read {}", agent::keys::ROOT);
    println!(
        "user {name} ({}), role {name} granted; it logs in with {}",
        made(granted.user_created),
        match certificate {
            true => format!("a client certificate whose common name is {name} (no password)"),
            false => "the password of --password-file".to_string(),
        }
    );
    Ok(())
}

/// How to reach etcd, from the global flags.
fn connection(args: &AgentArgs) -> agent::forget::Connection {
    agent::forget::Connection {
        endpoints: args.etcd_endpoints.clone(),
        ca: args.etcd_ca.clone(),
        cert: args.etcd_cert.clone(),
        key: args.etcd_key.clone(),
        user: args.etcd_user.clone(),
        password_file: args.etcd_password_file.clone(),
    }
}

/// The agent binary's entry point: logs on stderr, then run until SIGTERM.
pub fn main() -> ExitCode {
    crate::logging::init();
    let args = AgentArgs::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wg-cni agent: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        AgentArgs::command().debug_assert();
        let args = AgentArgs::try_parse_from([
            "wg-cni-agent",
            "forget-node",
            "n1",
            "--etcd-endpoints",
            "http://192.0.2.1:2379",
        ])
        .unwrap();
        assert!(
            matches!(args.command, Some(AgentCommand::ForgetNode { ref name, .. }) if name == "n1")
        );
        assert_eq!(args.etcd_endpoints, ["http://192.0.2.1:2379"]);
        // /metrics: on loopback unless told, and "off" turns it off.
        assert_eq!(
            args.metrics_listen.0,
            Some("127.0.0.1:9766".parse().unwrap())
        );
        let off = [
            "wg-cni-agent",
            "--etcd-endpoints",
            "http://192.0.2.1:2379",
            "--metrics-listen",
            "off",
        ];
        assert!(
            AgentArgs::try_parse_from(off)
                .unwrap()
                .metrics_listen
                .0
                .is_none()
        );
        let bad = [
            "wg-cni-agent",
            "--etcd-endpoints",
            "http://192.0.2.1:2379",
            "--metrics-listen",
            "9766",
        ];
        assert_eq!(
            AgentArgs::try_parse_from(bad).err().map(|e| e.exit_code()),
            Some(2)
        );
        // The DaemonSet passes the node's name and address through the downward API.
        let command = AgentArgs::command();
        let env_of = |id: &str| {
            command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env_of("node").as_deref(), Some("NODE_NAME"));
        assert_eq!(env_of("endpoint").as_deref(), Some("HOST_IP"));
        // Template flags without a template are a usage error (exit code 2), not ignored.
        for flag in ["--conflist-out", "--cluster-range", "--service-range"] {
            let refused = AgentArgs::try_parse_from([
                "wg-cni-agent",
                "--etcd-endpoints",
                "http://192.0.2.1:2379",
                flag,
                "10.0.0.0/16",
            ]);
            assert_eq!(refused.err().map(|e| e.exit_code()), Some(2), "{flag}");
        }
    }
}
