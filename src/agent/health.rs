//! `/healthz` and `/readyz` over a minimal HTTP/1.1 server (GET only, one response per
//! connection), and the shared status they report.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ipnetwork::IpNetwork;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One network's state as the health endpoints and the reconciler see it.
#[derive(Debug, Clone, Default)]
pub struct NetStatus {
    pub first_sync_done: bool,
    pub lease_held: bool,
    pub subnets: Option<Vec<IpNetwork>>,
    /// Why the subnet is not usable (claim lost, nothing free, etcd error).
    pub subnet_error: Option<String>,
    pub stale_nodes: BTreeSet<String>,
    /// What the membership layer refused of other nodes' keys, by reason.
    pub refused: BTreeMap<super::membership::Refusal, u64>,
}

/// Shared by the network loops, the health server and whoever embeds the agent.
#[derive(Debug, Default)]
pub struct AgentStatus {
    networks: Mutex<BTreeMap<String, NetStatus>>,
}

impl AgentStatus {
    /// Whether the network's first complete list of etcd has been mirrored: before that the
    /// mirror may lack records, so no peer may be removed on its evidence.
    pub fn first_sync_done(&self, network: &str) -> bool {
        self.get(network).is_some_and(|s| s.first_sync_done)
    }

    #[allow(dead_code)] // for the reconciler and `show`
    pub fn get(&self, network: &str) -> Option<NetStatus> {
        self.networks.lock().unwrap().get(network).cloned()
    }

    pub fn update(&self, network: &str, change: impl FnOnce(&mut NetStatus)) {
        change(
            self.networks
                .lock()
                .unwrap()
                .entry(network.to_string())
                .or_default(),
        );
    }

    /// `Ok` when every served network is synced, holds its lease and knows its subnet.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        let networks = self.networks.lock().unwrap();
        if networks.is_empty() {
            return Err("no wg-cni network for this store in the CNI conf dir".into());
        }
        for (name, s) in networks.iter() {
            if let Some(e) = &s.subnet_error {
                return Err(format!("network {name}: {e}"));
            }
            if s.subnets.is_none() {
                return Err(format!("network {name}: subnet not known yet"));
            }
            if !s.lease_held {
                return Err(format!("network {name}: liveness lease not held"));
            }
            if !s.first_sync_done {
                return Err(format!("network {name}: first sync not done"));
            }
        }
        Ok(())
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on --health-listen {addr}"))
}

/// Serve until the task is dropped.
pub async fn serve(listener: TcpListener, status: Arc<AgentStatus>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut len = 0;
            // Read the request head, bounded in size and time.
            let read = tokio::time::timeout(Duration::from_secs(2), async {
                while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let (code, body) = respond(head.lines().next().unwrap_or_default(), &status);
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                _ => "Service Unavailable",
            };
            let response = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

fn respond(request_line: &str, status: &AgentStatus) -> (u16, String) {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return (405, "only GET\n".into());
    }
    match path {
        "/healthz" => (200, "ok\n".into()),
        "/readyz" => match status.readiness() {
            Ok(()) => (200, "ready\n".into()),
            Err(reason) => (503, format!("{reason}\n")),
        },
        _ => (404, "try /healthz or /readyz\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_synced_leased_and_subnet_known() {
        let s = AgentStatus::default();
        assert_eq!(respond("GET /healthz HTTP/1.1", &s).0, 200);
        assert_eq!(respond("GET /readyz HTTP/1.1", &s).0, 503);
        s.update("net", |n| {
            n.subnets = Some(vec!["10.0.0.0/24".parse().unwrap()])
        });
        s.update("net", |n| n.lease_held = true);
        let (code, body) = respond("GET /readyz HTTP/1.1", &s);
        assert_eq!(code, 503);
        assert!(body.contains("first sync"), "{body}");
        assert!(!s.first_sync_done("net"));
        s.update("net", |n| n.first_sync_done = true);
        assert!(s.first_sync_done("net"));
        assert_eq!(respond("GET /readyz HTTP/1.1", &s).0, 200);
        assert_eq!(respond("POST /readyz HTTP/1.1", &s).0, 405);
        assert_eq!(respond("GET /x HTTP/1.1", &s).0, 404);
    }
}
