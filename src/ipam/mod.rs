//! Delegation to the IPAM plugin named by `ipam.type`: found in CNI_PATH, run with our
//! environment, given our config with `cniVersion` lowered to the highest version it speaks
//! (Debian's host-local stops at 1.0.0 and refuses 1.1.0 with code 1).
//! Asking VERSION costs a whole exec, so it is asked only when it matters: for a 1.1.0 config,
//! or after the plugin refused an older version with code 1. Every plugin of recent years
//! speaks 0.3.0 to 1.0.0. The answer is remembered across commands (`versions`).

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::cni::version::Version;
use crate::cni::{CniEnv, CniResult, Error, NetConf, Result};

mod versions;

pub struct Ipam<'a> {
    binary: PathBuf,
    env: &'a CniEnv,
    conf: &'a NetConf,
    /// The version negotiated through VERSION, once asked (shared: DEL releases addresses
    /// on a thread of its own).
    negotiated: OnceLock<Version>,
}

/// Which attachment a call is about (differs from the env's for GC and reaping).
pub struct Target<'a> {
    pub container_id: &'a str,
    pub ifname: &'a str,
    pub netns: Option<&'a Path>,
}

impl<'a> Ipam<'a> {
    /// Find the IPAM binary; a missing one is a config error naming `ipam.type`.
    pub fn find(env: &'a CniEnv, conf: &'a NetConf) -> Result<Ipam<'a>> {
        let binary = locate(&env.path, &conf.ipam_type).ok_or_else(|| {
            Error::config(
                "ipam.type",
                format!(
                    "IPAM plugin \"{}\" not found (or not executable) in CNI_PATH {}",
                    conf.ipam_type,
                    join_paths(&env.path)
                ),
            )
        })?;
        Ok(Ipam {
            binary,
            env,
            conf,
            negotiated: OnceLock::new(),
        })
    }

    pub fn target_of_env(&self) -> Target<'a> {
        Target {
            container_id: &self.env.container_id,
            ifname: &self.env.ifname,
            netns: self.env.netns.as_deref(),
        }
    }

    /// The versions the plugin reports through VERSION.
    pub fn supported_versions(&self) -> Result<Vec<Version>> {
        let output = self.exec("VERSION", None, &json!({"cniVersion": "0.4.0"}), None)?;
        let versions = output
            .get("supportedVersions")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                Error::decode(
                    format!("VERSION answer of {}", self.conf.ipam_type),
                    "has no \"supportedVersions\"",
                )
            })?;
        Ok(versions
            .iter()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect())
    }

    /// The highest version both the config and the plugin speak, asked through VERSION (once
    /// per process; the answer is remembered for later commands).
    pub fn negotiate(&self) -> Result<Version> {
        if let Some(version) = self.negotiated.get() {
            return Ok(*version);
        }
        let supported = self.supported_versions()?;
        versions::remember(&self.binary, &supported);
        let version = self.highest_shared(supported)?;
        Ok(*self.negotiated.get_or_init(|| version))
    }

    fn highest_shared(&self, supported: Vec<Version>) -> Result<Version> {
        let wanted = self.conf.cni_version;
        supported
            .into_iter()
            .filter(|v| *v <= wanted && v.is_supported())
            .max()
            .ok_or_else(|| {
                Error::IncompatibleVersion(format!(
                    "IPAM plugin {} speaks no CNI version up to {wanted}",
                    self.conf.ipam_type
                ))
            })
    }

    /// The version to try first: the config's own up to 1.0.0, else the negotiated one (from
    /// the plugin's remembered answer when there is one).
    fn version(&self) -> Result<Version> {
        match self.negotiated.get() {
            Some(version) => Ok(*version),
            None if self.conf.cni_version <= Version::V1_0_0 => Ok(self.conf.cni_version),
            None => match versions::remembered(&self.binary) {
                Some(supported) => self.highest_shared(supported),
                None => self.negotiate(),
            },
        }
    }

    /// Whether the plugin refused (code 1) a version this process had not asked it about; a
    /// remembered answer may be stale then, and is forgotten.
    fn refused_unasked<T>(&self, outcome: &Result<T>) -> bool {
        let refused = matches!(outcome, Err(Error::Delegated { code: 1, .. }))
            && self.negotiated.get().is_none();
        if refused {
            versions::forget(&self.binary);
        }
        refused
    }

    /// Run `command` in the version to try first; if the plugin refuses that version
    /// (code 1) and we had not asked, negotiate and run it once more.
    fn call(
        &self,
        command: &str,
        target: Option<&Target>,
        prev: Option<&CniResult>,
        hand_down: Option<BorrowedFd>,
    ) -> Result<Value> {
        let version = self.version()?;
        let outcome = self.exec(command, target, &self.config(version, prev), hand_down);
        if self.refused_unasked(&outcome) {
            let version = self.negotiate()?;
            return self.exec(command, target, &self.config(version, prev), hand_down);
        }
        outcome
    }

    /// ADD, with `held` (a lock on this attachment) handed down to the plugin: the lock then
    /// outlives us while the plugin runs, so a DEL after a killed ADD waits for an orphaned
    /// plugin to finish its reservation before it releases it.
    pub fn add(&self, held: BorrowedFd) -> Result<CniResult> {
        let output = self.call("ADD", Some(&self.target_of_env()), None, Some(held))?;
        CniResult::parse(&output, &format!("{} result", self.conf.ipam_type))
    }

    /// Release `target`'s addresses; the plugin treats an unknown one as success.
    pub fn del(&self, target: &Target, prev: Option<&CniResult>) -> Result<()> {
        self.call("DEL", Some(target), prev, None).map(drop)
    }

    pub fn check(&self, prev: &CniResult) -> Result<()> {
        if self.version()? < Version::V0_4_0 {
            return Ok(()); // CHECK did not exist before 0.4.0
        }
        self.call("CHECK", Some(&self.target_of_env()), Some(prev), None)
            .map(drop)
    }

    /// Forward a 1.1 command (GC, STATUS) when the plugin speaks 1.1; `false` when it does not.
    pub fn forward_v1_1(&self, command: &str) -> Result<bool> {
        if self.version()? < Version::V1_1_0 {
            return Ok(false);
        }
        let config = self.config(Version::V1_1_0, None);
        let outcome = self.exec(command, None, &config, None);
        if self.refused_unasked(&outcome) {
            if self.negotiate()? < Version::V1_1_0 {
                return Ok(false);
            }
            return self.exec(command, None, &config, None).map(|_| true);
        }
        outcome.map(|_| true)
    }

    fn config(&self, version: Version, prev: Option<&CniResult>) -> Value {
        let mut config = Value::Object(self.conf.raw.clone());
        config["cniVersion"] = version.to_string().into();
        match prev {
            Some(result) => config["prevResult"] = result.to_json(version),
            None => {
                if let Some(map) = config.as_object_mut() {
                    map.remove("prevResult");
                }
            }
        }
        config
    }

    fn exec(
        &self,
        command: &str,
        target: Option<&Target>,
        config: &Value,
        hand_down: Option<BorrowedFd>,
    ) -> Result<Value> {
        let mut cmd = Command::new(&self.binary);
        if let Some(fd) = hand_down.map(|fd| fd.as_raw_fd()) {
            // SAFETY: fcntl is async-signal-safe; it clears close-on-exec in the child only.
            unsafe {
                cmd.pre_exec(move || match nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) {
                    -1 => Err(std::io::Error::last_os_error()),
                    _ => Ok(()),
                });
            }
        }
        cmd.env("CNI_COMMAND", command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(t) = target {
            cmd.env("CNI_CONTAINERID", t.container_id)
                .env("CNI_IFNAME", t.ifname)
                .env(
                    "CNI_NETNS",
                    t.netns
                        .map(|p| p.as_os_str().to_owned())
                        .unwrap_or_default(),
                );
        }
        let what = format!("{} {command}", self.conf.ipam_type);
        let mut child = cmd.spawn().map_err(|e| Error::Io {
            context: format!("running {what}"),
            source: e,
        })?;
        let body = serde_json::to_vec(config).expect("config serializes");
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that exits without reading is reported by its status below.
            let _ = stdin.write_all(&body);
        }
        let output = child.wait_with_output().map_err(|e| Error::Io {
            context: format!("running {what}"),
            source: e,
        })?;
        let parsed: Option<Value> = serde_json::from_slice(&output.stdout).ok();
        if !output.status.success() {
            let error = parsed.unwrap_or(Value::Null);
            return Err(Error::Delegated {
                plugin: self.conf.ipam_type.clone(),
                code: error.get("code").and_then(Value::as_u64).unwrap_or(999) as u32,
                msg: error
                    .get("msg")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{what} failed ({})", output.status)),
                details: error
                    .get("details")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            });
        }
        if output.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null); // DEL, CHECK and GC print nothing on success
        }
        parsed.ok_or_else(|| Error::decode(format!("output of {what}"), "is not JSON"))
    }
}

/// The first executable `name` in `dirs`.
pub fn locate(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.iter().map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn join_paths(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":")
}
