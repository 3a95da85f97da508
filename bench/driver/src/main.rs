//! wg-cni-bench: the measuring half of `make bench` (scripts/bench.sh is the other half).
//!
//! `wg-cni-bench PHASE[,PHASE...] [--option value]...` runs the phases in order and emits one
//! JSON document per phase, as a line `WGCNI-BENCH-PART <label>.<phase> <json>` on stdout (the
//! QEMU guest has no shared folder: the host reads the console) and, with `--out-dir`, as
//! `<dir>/<label>.<phase>.json`. `report` turns a directory of parts into results.md/.json.
//!
//! Phases: latency, scale, scale-ondemand, parallel, throughput, memory, profile, multinode,
//! direct, agent, report.
//! Everything it creates (network namespaces `wgbench-*`, daemons, iperf3 servers) is removed
//! when a phase ends, also on error; pids of long-lived children go to `--pids-file` so that
//! the wrapper can end them if this process is killed.

mod agent;
mod cleanup;
mod cluster;
mod cni;
mod direct;
mod exec;
mod latency;
mod memory;
mod multinode;
mod ns;
mod ondemand;
mod parallel;
mod profile;
mod report;
mod rotation;
mod scale;
mod stats;
mod throughput;
mod uapi;

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::Value;

pub type Res<T> = Result<T, String>;

/// Everything a phase needs to know about where things are.
pub struct Ctx {
    pub label: String,
    /// `userspace` natively, `kernel` in the guest.
    pub backend: String,
    pub wg: PathBuf,
    pub cni_path: PathBuf,
    pub ip: PathBuf,
    pub wgtool: PathBuf,
    pub wireguard_go: PathBuf,
    pub iperf3: PathBuf,
    pub strace: Option<PathBuf>,
    pub work: PathBuf,
    pub out_dir: Option<PathBuf>,
    pub pids_file: Option<PathBuf>,
    pub opts: Opts,
}

/// `--key value` options.
pub struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Res<Opts> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {a}"))?;
            let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            map.insert(key.to_string(), value.clone());
        }
        Ok(Opts(map))
    }
    pub fn str(&self, key: &str, default: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
    pub fn opt(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
    pub fn num(&self, key: &str, default: usize) -> usize {
        self.0
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}

impl Ctx {
    /// Print (and save) one phase's result.
    pub fn emit(&self, phase: &str, value: &Value) -> Res<()> {
        let text = serde_json::to_string(value).map_err(|e| e.to_string())?;
        println!("WGCNI-BENCH-PART {}.{} {}", self.label, phase, text);
        if let Some(dir) = &self.out_dir {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            let path = dir.join(format!("{}.{}.json", self.label, phase));
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Remember a long-lived child for the wrapper's cleanup.
    pub fn note_pid(&self, pid: u32) {
        if let Some(path) = &self.pids_file {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{pid}");
            }
        }
    }
}

pub fn log(msg: impl AsRef<str>) {
    eprintln!("wg-cni-bench: {}", msg.as_ref());
}

fn find_tool(name: &str, extra: &[&str]) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(name))
        .chain(extra.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(phases) = args.first() else {
        eprintln!(
            "usage: wg-cni-bench latency,scale,scale-ondemand,parallel,throughput,memory,profile,multinode,direct,agent|report [--opt value]..."
        );
        std::process::exit(2);
    };
    let opts = match Opts::parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("wg-cni-bench: {e}");
            std::process::exit(2);
        }
    };
    let work = PathBuf::from(opts.str("work", "/tmp/wgbench"));
    let ctx = Ctx {
        label: opts.str("label", "native"),
        backend: opts.str("backend", "userspace"),
        wg: PathBuf::from(opts.str("wg", "target/x86_64-unknown-linux-gnu/release/wg-cni")),
        cni_path: PathBuf::from(opts.str("cni-path", "/usr/lib/cni")),
        ip: find_tool("ip", &["/usr/sbin/ip", "/sbin/ip"]),
        wgtool: find_tool("wg", &["/usr/bin/wg"]),
        wireguard_go: find_tool("wireguard-go", &["/usr/bin/wireguard-go"]),
        iperf3: PathBuf::from(opts.str("iperf3", &find_tool("iperf3", &[]).to_string_lossy())),
        strace: opts.opt("strace").map(PathBuf::from),
        out_dir: opts.opt("out-dir").map(PathBuf::from),
        pids_file: opts.opt("pids-file").map(PathBuf::from),
        work,
        opts,
    };
    let mut failed = false;
    for phase in phases.split(',') {
        let started = std::time::Instant::now();
        log(format!("[{}] phase {phase} starts", ctx.label));
        let result = match phase {
            "latency" => latency::run(&ctx),
            "scale" => scale::run(&ctx),
            "scale-ondemand" => ondemand::run(&ctx),
            "parallel" => parallel::run(&ctx),
            "throughput" => throughput::run(&ctx),
            "memory" => memory::run(&ctx),
            "multinode" => multinode::run(&ctx),
            "direct" => direct::run(&ctx),
            "agent" => agent::run(&ctx),
            "profile" => profile::run(&ctx),
            "report" => report::run(&ctx),
            "cleanup" => cleanup::run(&ctx),
            other => Err(format!("unknown phase {other}")),
        };
        // Whatever the phase left (on error): namespaces and children.
        ns::cleanup_all(&ctx);
        exec::kill_registered();
        if phase != "report" && phase != "cleanup" {
            let _ = cleanup::run(&ctx);
        }
        match result {
            Ok(value) => {
                if phase != "report" && phase != "cleanup" {
                    let mut value = value;
                    value["phase_seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
                    if let Err(e) = ctx.emit(phase, &value) {
                        log(format!("cannot write {phase}: {e}"));
                        failed = true;
                    }
                }
                log(format!(
                    "[{}] phase {phase} done in {:.1} s",
                    ctx.label,
                    started.elapsed().as_secs_f64()
                ));
            }
            Err(e) => {
                log(format!("[{}] phase {phase} FAILED: {e}", ctx.label));
                let value = serde_json::json!({"error": e, "phase_seconds": started.elapsed().as_secs_f64()});
                let _ = ctx.emit(phase, &value);
                failed = true;
            }
        }
    }
    std::process::exit(if failed { 1 } else { 0 });
}
