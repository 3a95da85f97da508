//! `wg-cni install`: put the plugin (and wg-cni's userspace daemon, where it sits beside the
//! plugin) into the host's CNI bin dir, next to host-local. Each binary is copied to a temp
//! file in that directory, fsynced and renamed over the old one, and the directory fsynced:
//! a runtime exec'ing the plugin meanwhile runs the old binary or the new one, never half a
//! file (a running binary keeps its old inode). A binary already identical is left alone, so
//! installing twice changes nothing.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::cni::{Error, Result};

/// What the install step copies: the plugin, and the daemon of userspace links (it finds it
/// beside itself first).
pub const BINARIES: [&str; 2] = ["wg-cni", "wg-cni-wgd"];

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Installed,
    UpToDate,
    /// Not beside this binary (the daemon is optional: the kernel backend needs none).
    NotFound,
}

/// Install every binary of `BINARIES` found in `from` into `bin_dir`.
pub fn install(from: &Path, bin_dir: &Path) -> Result<Vec<(String, Outcome)>> {
    if !bin_dir.is_dir() {
        return Err(Error::config(
            "--cni-bin-dir",
            format!(
                "{} is not a directory (the container runtime's CNI bin dir, e.g. /opt/cni/bin)",
                bin_dir.display()
            ),
        ));
    }
    let mut done = Vec::new();
    for name in BINARIES {
        let source = from.join(name);
        let outcome = if source.is_file() {
            copy_atomically(&source, &bin_dir.join(name))?
        } else {
            Outcome::NotFound
        };
        done.push((name.to_string(), outcome));
    }
    Ok(done)
}

fn copy_atomically(source: &Path, target: &Path) -> Result<Outcome> {
    let io = |what: String| {
        move |e: std::io::Error| Error::Io {
            context: what,
            source: e,
        }
    };
    let bytes = fs::read(source).map_err(io(format!("reading {}", source.display())))?;
    if same_file(source, target) || fs::read(target).is_ok_and(|old| old == bytes) {
        return Ok(Outcome::UpToDate);
    }
    let dir = target.parent().unwrap_or(Path::new("/"));
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let temp: PathBuf = dir.join(format!(".{name}.install-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let _ = fs::remove_file(&temp);
        let mut file = fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o755)
            .open(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&temp, target)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        io(format!("installing {}", target.display()))(e)
    })?;
    Ok(Outcome::Installed)
}

/// Installing from the bin dir into itself is a no-op, not a copy over itself.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn copies_what_is_there_once_and_replaces_a_changed_binary() {
        let from = tempfile::tempdir().unwrap();
        let bin = tempfile::tempdir().unwrap();
        fs::write(from.path().join("wg-cni"), b"plugin v1").unwrap();
        let first = install(from.path(), bin.path()).unwrap();
        assert_eq!(
            first,
            [
                ("wg-cni".to_string(), Outcome::Installed),
                ("wg-cni-wgd".to_string(), Outcome::NotFound)
            ]
        );
        let installed = bin.path().join("wg-cni");
        assert_eq!(fs::read(&installed).unwrap(), b"plugin v1");
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let again = install(from.path(), bin.path()).unwrap();
        assert_eq!(again[0].1, Outcome::UpToDate);

        // A new build replaces the old one by rename: a holder of the old inode keeps it.
        let old = fs::File::open(&installed).unwrap();
        fs::write(from.path().join("wg-cni"), b"plugin v2").unwrap();
        fs::write(from.path().join("wg-cni-wgd"), b"daemon").unwrap();
        let third = install(from.path(), bin.path()).unwrap();
        assert!(third.iter().all(|(_, o)| *o == Outcome::Installed));
        assert_eq!(fs::read(&installed).unwrap(), b"plugin v2");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut &old, &mut text).unwrap();
        assert_eq!(text, "plugin v1");
        assert_eq!(
            fs::read_dir(bin.path()).unwrap().count(),
            2,
            "no temp file left"
        );

        // Installing the bin dir's own binaries into it: nothing to do.
        assert!(
            install(bin.path(), bin.path())
                .unwrap()
                .iter()
                .all(|(_, o)| *o == Outcome::UpToDate)
        );
        let e = install(from.path(), &bin.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("--cni-bin-dir"), "{e}");
    }
}
