//! Network namespaces named `wgbench-*`, made with `ip netns add` (as a runtime's pod
//! sandbox would be, a bind mount under /run/netns), tracked so that every one is deleted.

use std::collections::BTreeSet;
use std::fs::File;
use std::sync::Mutex;

use crate::exec::sh;
use crate::{Ctx, Res};

static CREATED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

pub const PREFIX: &str = "wgbench-";

/// The path runtimes pass as CNI_NETNS.
pub fn path(name: &str) -> String {
    format!("/var/run/netns/{name}")
}

pub fn add(ctx: &Ctx, name: &str) -> Res<String> {
    assert!(name.starts_with(PREFIX));
    // A leftover of a killed earlier run would make `ip netns add` fail.
    if std::path::Path::new(&path(name)).exists() {
        let _ = sh(&ctx.ip, &["netns", "del", name], None);
    }
    sh(&ctx.ip, &["netns", "add", name], None)?;
    CREATED.lock().unwrap().insert(name.to_string());
    Ok(path(name))
}

pub fn del(ctx: &Ctx, name: &str) {
    if let Err(e) = sh(&ctx.ip, &["netns", "del", name], None) {
        crate::log(format!("deleting netns {name}: {e}"));
    }
    CREATED.lock().unwrap().remove(name);
}

pub fn open(name: &str) -> Res<File> {
    File::open(path(name)).map_err(|e| format!("opening netns {name}: {e}"))
}

pub fn cleanup_all(ctx: &Ctx) {
    let names: Vec<String> = CREATED.lock().unwrap().iter().cloned().collect();
    for name in names {
        del(ctx, &name);
    }
}
