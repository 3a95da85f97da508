//! wg-cni: a CNI plugin whose pods get exactly one link, a WireGuard interface, and its node
//! agent. Two binaries share this library: `wg-cni` (the plugin and the CLI for people) and
//! `wg-cni-agent` (the agent, with the etcd client and an async runtime the plugin never links).

pub mod agent;
pub mod agent_presence;
pub mod cni;
pub mod commands;
pub mod conntrack;
pub mod failpoint;
pub mod flows;
pub mod gateway;
pub mod host;
pub mod install;
pub mod ipam;
pub mod keys;
pub mod lease;
pub mod link;
pub mod logging;
pub mod mesh;
pub mod nat;
pub mod netns;
pub mod node_paths;
pub mod ports;
pub mod readiness;
pub mod reconcile;
pub mod rotate;
pub mod show;
pub mod store;
pub mod uninstall;
pub mod wireguard;

#[cfg(test)]
mod fuzz_tests;
