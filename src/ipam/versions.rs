//! What each IPAM plugin answered to VERSION, remembered across commands in one file under
//! `/run/wg-cni` (a tmpfs: forgotten at reboot). For a CNI 1.1.0 config (Debian's host-local
//! stops at 1.0.0) every ADD, CHECK, DEL, GC and STATUS would otherwise exec the plugin twice.
//! An answer is kept with the binary's identity (device, inode, size, change time), so a
//! plugin upgraded or replaced is asked again; one that refuses the remembered version is
//! forgotten (a wrapper script whose target changed keeps its own identity).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cni::version::Version;

const DIR: &str = "/run/wg-cni";
const FILE: &str = "/run/wg-cni/ipam-versions.json";
/// A cache, not a store: a file larger than this is not ours to read.
const MAX_BYTES: u64 = 64 * 1024;

/// The remembered answers, by the binary's path.
type Answers = BTreeMap<PathBuf, Answer>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Answer {
    /// Device, inode, size, change time (seconds, nanoseconds) of the binary when it answered.
    identity: [i64; 5],
    versions: Vec<String>,
}

/// The versions `binary` answered before, if it is still the same file.
pub fn remembered(binary: &Path) -> Option<Vec<Version>> {
    remembered_in(Path::new(FILE), binary)
}

/// Remember `binary`'s answer. Best effort: a cache that cannot be written costs the next
/// command one exec, nothing else.
pub fn remember(binary: &Path, versions: &[Version]) {
    if let Err(e) = remember_in(Path::new(DIR), Path::new(FILE), binary, versions) {
        tracing::debug!(error = %e, "could not remember the IPAM plugin's versions");
    }
}

/// Forget `binary`'s answer (it refused a version it had named).
pub fn forget(binary: &Path) {
    let _ = update(Path::new(DIR), Path::new(FILE), |answers| {
        answers.remove(binary);
    });
}

fn remembered_in(file: &Path, binary: &Path) -> Option<Vec<Version>> {
    let answer = read(file).remove(binary)?;
    (answer.identity == identity(binary)?).then(|| {
        answer
            .versions
            .iter()
            .filter_map(|v| v.parse().ok())
            .collect()
    })
}

fn remember_in(
    dir: &Path,
    file: &Path,
    binary: &Path,
    versions: &[Version],
) -> std::io::Result<()> {
    let identity = identity(binary).ok_or_else(|| std::io::Error::other("binary unreadable"))?;
    let versions = versions.iter().map(Version::to_string).collect();
    update(dir, file, |answers| {
        answers.insert(binary.to_path_buf(), Answer { identity, versions });
    })
}

/// Read, change and atomically replace the file (dropping the answers of binaries that are
/// gone). Two commands writing at once may lose one answer: it is asked again next time.
fn update(dir: &Path, file: &Path, change: impl FnOnce(&mut Answers)) -> std::io::Result<()> {
    let mut answers = read(file);
    answers.retain(|binary, _| binary.exists()); // plugins since removed
    change(&mut answers);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let temporary = file.with_extension(format!("tmp-{}", std::process::id()));
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&temporary)?;
    out.write_all(&serde_json::to_vec(&answers).map_err(std::io::Error::other)?)?;
    drop(out);
    std::fs::rename(&temporary, file).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

fn read(file: &Path) -> Answers {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(file);
    let Ok(opened) = opened else {
        return Answers::new();
    };
    if opened
        .metadata()
        .map_or(true, |m| !m.is_file() || m.len() > MAX_BYTES)
    {
        return Answers::new();
    }
    let mut bytes = Vec::new();
    use std::io::Read;
    if opened.take(MAX_BYTES).read_to_end(&mut bytes).is_err() {
        return Answers::new();
    }
    serde_json::from_slice(&bytes).unwrap_or_default()
}

fn identity(binary: &Path) -> Option<[i64; 5]> {
    let meta = std::fs::metadata(binary).ok()?;
    Some([
        meta.dev() as i64,
        meta.ino() as i64,
        meta.size() as i64,
        meta.ctime(),
        meta.ctime_nsec(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_holds_while_the_binary_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run/versions.json");
        let binary = dir.path().join("host-local");
        std::fs::write(&binary, b"one").unwrap();
        let answer = [Version(0, 4, 0), Version::V1_0_0];

        assert_eq!(remembered_in(&file, &binary), None);
        remember_in(&dir.path().join("run"), &file, &binary, &answer).unwrap();
        assert_eq!(remembered_in(&file, &binary), Some(answer.to_vec()));

        // Replaced (a package upgrade renames a new file into place): asked again.
        let upgrade = dir.path().join("host-local.new");
        std::fs::write(&upgrade, b"two, longer").unwrap();
        std::fs::rename(&upgrade, &binary).unwrap();
        assert_eq!(remembered_in(&file, &binary), None);
    }

    #[test]
    fn a_damaged_file_is_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("versions.json");
        let binary = dir.path().join("host-local");
        std::fs::write(&binary, b"x").unwrap();
        std::fs::write(&file, b"{ not json").unwrap();
        assert_eq!(remembered_in(&file, &binary), None);
        remember_in(dir.path(), &file, &binary, &[Version::V1_0_0]).unwrap();
        assert_eq!(remembered_in(&file, &binary), Some(vec![Version::V1_0_0]));
    }
}
