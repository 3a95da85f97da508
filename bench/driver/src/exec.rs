//! Running a program the way a container runtime runs a CNI plugin (fork/exec, config on
//! stdin, result on stdout, wait), timed from spawn to reaped, with the child's rusage from
//! wait4 (ru_maxrss: the largest RSS of the child or of any descendant it waited for).

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::Res;

pub struct Exec {
    pub us: f64,
    pub rss_kb: u64,
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Exec {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.stdout).ok()
    }
    /// A one-line reason for a failure report.
    pub fn why(&self) -> String {
        let out = String::from_utf8_lossy(&self.stdout);
        let err: String = self.stderr.chars().rev().take(300).collect::<String>();
        let err: String = err.chars().rev().collect();
        format!(
            "exit {} stdout={} stderr={}",
            self.code,
            out.trim(),
            err.trim().replace('\n', " | ")
        )
    }
}

/// Children that are running right now (plugins under a watchdog, daemons, servers).
static RUNNING: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

fn register(pid: i32) {
    RUNNING
        .lock()
        .unwrap()
        .get_or_insert_with(HashSet::new)
        .insert(pid);
}
fn unregister(pid: i32) {
    if let Some(set) = RUNNING.lock().unwrap().as_mut() {
        set.remove(&pid);
    }
}

/// SIGKILL every registered child that still runs (by pid; they are our own, unreaped).
pub fn kill_registered() {
    let pids: Vec<i32> = RUNNING
        .lock()
        .unwrap()
        .as_ref()
        .map(|s| s.iter().copied().collect())
        .unwrap_or_default();
    for pid in pids {
        // SAFETY: plain syscalls on our own child pids.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
        unregister(pid);
    }
}

/// Kill the given children if still registered (a watchdog's deadline passed).
pub fn kill_if_running(pids: &[i32]) {
    let guard = RUNNING.lock().unwrap();
    if let Some(set) = guard.as_ref() {
        for pid in pids {
            if set.contains(pid) {
                // SAFETY: our own child, not yet reaped (it is still registered).
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
    }
}

fn wait4(pid: i32) -> Res<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4({pid}): {err}"));
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    };
    Ok((code, ru))
}

pub struct Spec<'a> {
    pub bin: &'a Path,
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub stdin: &'a [u8],
    pub stderr: &'a Path,
    /// Enter this network namespace (an open nsfs fd) before exec.
    pub netns: Option<RawFd>,
    /// Called with the pid right after spawning (a watchdog registers it).
    pub on_spawn: Option<&'a (dyn Fn(i32) + Sync)>,
}

impl<'a> Spec<'a> {
    pub fn new(bin: &'a Path, args: &'a [String], stderr: &'a Path) -> Spec<'a> {
        Spec {
            bin,
            args,
            env: &[],
            stdin: b"",
            stderr,
            netns: None,
            on_spawn: None,
        }
    }
}

fn command(spec: &Spec) -> Res<Command> {
    let err = File::create(spec.stderr).map_err(|e| format!("{}: {e}", spec.stderr.display()))?;
    let mut cmd = Command::new(spec.bin);
    cmd.args(spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err);
    if let Some(fd) = spec.netns {
        // SAFETY: setns is async-signal-safe; runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Ok(cmd)
}

/// Run to completion: spawn, feed stdin, read stdout to EOF, wait4.
pub fn run(spec: &Spec) -> Res<Exec> {
    let mut cmd = command(spec)?;
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", spec.bin.display()))?;
    let pid = child.id() as i32;
    register(pid);
    if let Some(f) = spec.on_spawn {
        f(pid);
    }
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(spec.stdin);
    }
    let mut stdout = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_end(&mut stdout);
    }
    let waited = wait4(pid);
    let us = started.elapsed().as_secs_f64() * 1e6;
    unregister(pid);
    let (code, ru) = waited?;
    let stderr = if code != 0 {
        std::fs::read_to_string(spec.stderr).unwrap_or_default()
    } else {
        String::new()
    };
    Ok(Exec {
        us,
        rss_kb: ru.ru_maxrss as u64,
        code,
        stdout,
        stderr,
    })
}

/// A long-lived child (daemon, server): registered for cleanup, stdin closed.
pub struct Background {
    child: Child,
}

pub fn spawn(spec: &Spec, ctx: &crate::Ctx) -> Res<Background> {
    let mut cmd = command(spec)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let child = cmd
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", spec.bin.display()))?;
    register(child.id() as i32);
    ctx.note_pid(child.id());
    Ok(Background { child })
}

impl Background {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Wait up to `limit` for it to exit by itself, then SIGKILL it.
    pub fn finish(mut self, limit: Duration) -> Option<i32> {
        let started = Instant::now();
        let pid = self.child.id() as i32;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                unregister(pid);
                return status.code();
            }
            if started.elapsed() >= limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                unregister(pid);
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Run a helper command (ip, wg) and fail with its stderr.
pub fn sh(bin: &Path, args: &[&str], stdin: Option<&[u8]>) -> Res<String> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{} {}: {e}", bin.display(), args.join(" ")))?;
    if let (Some(data), Some(mut si)) = (stdin, child.stdin.take()) {
        let _ = si.write_all(data);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed: {}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
