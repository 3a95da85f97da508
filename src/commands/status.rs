//! STATUS (CNI 1.1): 50 when this node could not ADD (IPAM plugin missing, store not
//! writable, no WireGuard backend); forwarded to an IPAM that speaks 1.1.

use super::context::{self, Context};
use crate::cni::{Error, Result, Version};
use crate::ipam::Ipam;

pub fn run(ctx: &Context) -> Result<()> {
    let conf = ctx.conf;
    super::require_version(conf, Version::V1_1_0, "STATUS")?;
    let ipam = Ipam::find(ctx.env, conf).map_err(|e| Error::NotAvailable(e.to_string()))?;
    ctx.store()
        .and_then(|store| store.probe_writable())
        .map_err(|e| Error::NotAvailable(format!("cannot add pods: {e}")))?;
    context::choose_backend(conf.backend).map_err(|e| Error::NotAvailable(e.to_string()))?;
    ipam.forward_v1_1("STATUS")?;
    Ok(())
}
