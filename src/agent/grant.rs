//! `wg-cni-agent grant-node NAME --network N...`: create the etcd role and user of one node, so
//! that the node's agent may write only its own keys (`nodes/<node>/`, `links/<node>/` and
//! `subnets/<node>/` of each network) and read everything under the root. Run with an
//! administrator's credentials (or before `etcdctl auth enable`); running it again changes
//! nothing that is already there, and adds what a new network needs.

use anyhow::{Context, Result};
use etcd_client::{Permission, UserAddOptions};

use super::etcd::bounded;
use super::forget::Connection;
use super::keys::{Keys, ROOT};

/// How the node authenticates.
pub enum Login {
    /// A password (read from a file by the caller; never printed).
    Password(zeroize::Zeroizing<String>),
    /// A TLS client certificate whose common name is the node's name (etcd's
    /// `--client-cert-auth`): the user has no password.
    Certificate,
}

/// What was granted, for the operator.
pub struct Granted {
    pub role_created: bool,
    pub user_created: bool,
    /// The prefixes the role may write (each ends in '/').
    pub writes: Vec<String>,
}

/// Create (or complete) role and user `node` for `networks`.
pub fn grant_node(
    connection: &Connection,
    node: &str,
    networks: &[String],
    login: Login,
) -> Result<Granted> {
    connection.run(|mut client| async move {
        let role_created = match bounded(client.role_get(node)).await {
            Ok(_) => false,
            Err(e) if is_not_found(&e) => {
                bounded(client.role_add(node))
                    .await
                    .with_context(|| format!("adding role {node}"))?;
                true
            }
            Err(e) => return Err(e.context(format!("reading role {node}"))),
        };
        let mut writes = Vec::new();
        for network in networks {
            writes.extend(Keys::new(network).node_write_prefixes(node));
        }
        for prefix in &writes {
            grant(
                &mut client,
                node,
                Permission::read_write(prefix.as_str()),
                prefix,
            )
            .await?;
        }
        grant(&mut client, node, Permission::read(ROOT), ROOT).await?;
        let user_created = match bounded(client.user_get(node)).await {
            Ok(_) => false,
            Err(e) if is_not_found(&e) => {
                let (password, options) = match &login {
                    Login::Password(password) => (password.to_string(), None),
                    Login::Certificate => {
                        (String::new(), Some(UserAddOptions::new().with_no_pwd()))
                    }
                };
                bounded(client.user_add(node, password, options))
                    .await
                    .with_context(|| format!("adding user {node}"))?;
                true
            }
            Err(e) => return Err(e.context(format!("reading user {node}"))),
        };
        if !user_created && let Login::Password(password) = &login {
            bounded(client.user_change_password(node, password.to_string()))
                .await
                .with_context(|| format!("setting user {node}'s password"))?;
        }
        bounded(client.user_grant_role(node, node))
            .await
            .with_context(|| format!("granting role {node} to user {node}"))?;
        Ok(Granted {
            role_created,
            user_created,
            writes,
        })
    })
}

/// Grant `role` `permission` on every key under `prefix` (granting it again is harmless).
async fn grant(
    client: &mut etcd_client::Client,
    role: &str,
    permission: Permission,
    prefix: &str,
) -> Result<()> {
    bounded(client.role_grant_permission(role, permission.with_prefix()))
        .await
        .with_context(|| format!("granting role {role} access to {prefix}"))?;
    Ok(())
}

/// etcd says the role or user does not exist.
fn is_not_found(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("not found")
}
