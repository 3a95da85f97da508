//! `wg-cni install`: the real binary copies itself (and wg-cni-wgd beside it) into a CNI bin
//! dir atomically, and a second run changes nothing. Only files in temp dirs: no namespace,
//! no link.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

fn run(binary: &Path, args: &[&str]) -> Output {
    Command::new(binary)
        .args(args)
        .env_remove("CNI_COMMAND")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn install_copies_the_plugin_and_its_daemon_atomically_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let (from, bin) = (dir.path().join("image"), dir.path().join("opt-cni-bin"));
    fs::create_dir_all(&from).unwrap();
    fs::create_dir_all(&bin).unwrap();
    let plugin = from.join("wg-cni");
    fs::copy(env!("CARGO_BIN_EXE_wg-cni"), &plugin).unwrap();
    // The daemon as the image holds it (any executable stands in: install copies bytes).
    fs::write(from.join("wg-cni-wgd"), b"#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(from.join("wg-cni-wgd"), fs::Permissions::from_mode(0o700)).unwrap();
    let bin_arg = bin.to_str().unwrap();

    let first = run(&plugin, &["install", "--cni-bin-dir", bin_arg]);
    assert!(first.status.success(), "{}", text(&first));
    for name in ["wg-cni", "wg-cni-wgd"] {
        let installed = bin.join(name);
        assert!(
            text(&first).contains(&format!("installed {}", installed.display())),
            "{}",
            text(&first)
        );
        assert_eq!(
            fs::read(&installed).unwrap(),
            fs::read(from.join(name)).unwrap()
        );
        assert_eq!(fs::metadata(&installed).unwrap().mode() & 0o777, 0o755);
    }
    let mut names: Vec<String> = fs::read_dir(&bin)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["wg-cni", "wg-cni-wgd"], "no temp file left");
    // The installed plugin works.
    let version = run(&bin.join("wg-cni"), &["--version"]);
    assert!(version.status.success(), "{}", text(&version));

    // Again: nothing changes, not even the inode (the runtime's exec never sees a new file).
    let inode = fs::metadata(bin.join("wg-cni")).unwrap().ino();
    let second = run(&plugin, &["install", "--cni-bin-dir", bin_arg]);
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(
        text(&second).matches("is up to date").count(),
        2,
        "{}",
        text(&second)
    );
    assert_eq!(fs::metadata(bin.join("wg-cni")).unwrap().ino(), inode);

    // A changed daemon is replaced by rename (a new inode), the plugin stays.
    fs::write(from.join("wg-cni-wgd"), b"#!/bin/sh\nexit 1\n").unwrap();
    let wgd_inode = fs::metadata(bin.join("wg-cni-wgd")).unwrap().ino();
    let third = run(&plugin, &["install", "--cni-bin-dir", bin_arg]);
    assert!(third.status.success(), "{}", text(&third));
    assert_ne!(
        fs::metadata(bin.join("wg-cni-wgd")).unwrap().ino(),
        wgd_inode
    );
    assert_eq!(fs::metadata(bin.join("wg-cni")).unwrap().ino(), inode);
}

#[test]
fn install_without_a_bin_dir_or_beside_no_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("wg-cni");
    fs::copy(env!("CARGO_BIN_EXE_wg-cni"), &plugin).unwrap();
    let missing = dir.path().join("no-such-dir");
    let out = run(
        &plugin,
        &["install", "--cni-bin-dir", missing.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--cni-bin-dir") && text(&out).contains("not a directory"),
        "{}",
        text(&out)
    );
    assert!(!missing.exists());
    let out = run(&plugin, &["install", "--cni-bin-dir"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap's usage error: {}",
        text(&out)
    );

    // Only the plugin beside: installed, and the missing daemon named.
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let out = run(
        &plugin,
        &["install", "--cni-bin-dir", bin.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("wg-cni-wgd is not beside"),
        "{}",
        text(&out)
    );
    assert!(bin.join("wg-cni").is_file() && !bin.join("wg-cni-wgd").exists());
}
