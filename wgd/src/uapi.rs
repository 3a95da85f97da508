//! The UAPI socket /var/run/wireguard/NAME.sock (mode 0600), speaking the cross-platform
//! configuration protocol (`get=1`, `set=1`) like wireguard-go, so `wg show`/`wg set` and
//! wg-cni's own client work unchanged.
//!
//! Requests are read into buffers that are wiped when dropped (they may hold private keys),
//! answers likewise. A `listen_port` that cannot be bound is answered with its errno (98,
//! EADDRINUSE) and leaves the device as it was.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Weak};

use gotatun::device::uapi::UapiClient;
use gotatun::device::uapi::command::{Request, Response};
use gotatun::device::{Device, DeviceTransports};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use zeroize::Zeroizing;

use crate::in_place;
use crate::udp::Shared;

pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Largest request accepted (thousands of peers fit easily).
const MAX_REQUEST: usize = 64 << 20;

pub fn socket_path(name: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{name}.sock"))
}

/// Bind the socket with mode 0600 (umask around the bind: no window with wider access).
pub fn listen(name: &str) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o755).create(SOCKET_DIR) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let path = socket_path(name);
    // A stale socket of a dead daemon; a live one would be answered, refuse to steal it.
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another daemon serves this interface",
        ));
    }
    let _ = std::fs::remove_file(&path);
    // SAFETY: umask only changes the process file-mode mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = std::os::unix::net::UnixListener::bind(&path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// What a connection answers with: gotatun's UAPI handler, and the device itself for peer
/// changes applied in place (`in_place`). Weak: the daemon's shutdown owns the device.
pub struct Handlers<T: DeviceTransports> {
    pub client: UapiClient,
    pub device: Weak<Device<T>>,
    pub shared: Arc<Shared>,
}

impl<T: DeviceTransports> Clone for Handlers<T> {
    fn clone(&self) -> Self {
        Handlers {
            client: self.client.clone(),
            device: Weak::clone(&self.device),
            shared: Arc::clone(&self.shared),
        }
    }
}

pub async fn serve<T: DeviceTransports>(listener: UnixListener, handlers: Handlers<T>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handlers = handlers.clone();
        tokio::spawn(async move {
            let _ = connection(stream, handlers).await;
        });
    }
}

/// Append to a wiped buffer without leaving unwiped copies behind when it grows.
fn append(buf: &mut Zeroizing<Vec<u8>>, data: &[u8]) {
    if buf.len() + data.len() > buf.capacity() {
        let mut bigger = Zeroizing::new(Vec::with_capacity(
            (buf.len() + data.len()).next_power_of_two(),
        ));
        bigger.extend_from_slice(buf);
        *buf = bigger;
    }
    buf.extend_from_slice(data);
}

async fn connection<T: DeviceTransports>(
    mut stream: UnixStream,
    handlers: Handlers<T>,
) -> io::Result<()> {
    let mut pending = Zeroizing::new(Vec::with_capacity(4096));
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        // One request ends with an empty line.
        while let Some(end) = find_end(&pending) {
            let request = Zeroizing::new(pending[..end].to_vec());
            let rest = Zeroizing::new(pending[end + 2..].to_vec());
            let mut next = Zeroizing::new(Vec::with_capacity(rest.len().max(4096)));
            next.extend_from_slice(&rest);
            pending = next;
            let answer = handle(&request, &handlers).await;
            stream.write_all(answer.as_bytes()).await?;
        }
        let n = stream.read(&mut chunk[..]).await?;
        if n == 0 {
            return Ok(());
        }
        if pending.len() + n > MAX_REQUEST {
            stream.write_all(b"errno=7\n\n").await?;
            return Ok(());
        }
        append(&mut pending, &chunk[..n]);
    }
}

/// Index of the "\n\n" that ends the first request (or of a leading "\n": empty request).
fn find_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

fn errno_answer(errno: i32) -> Zeroizing<String> {
    Zeroizing::new(format!("errno={errno}\n\n"))
}

async fn handle<T: DeviceTransports>(request: &[u8], handlers: &Handlers<T>) -> Zeroizing<String> {
    let Handlers { client, shared, .. } = handlers;
    let Ok(text) = std::str::from_utf8(request) else {
        return errno_answer(libc::EPROTO);
    };
    let trimmed = text.trim_start_matches('\n');
    // Sized up front: growing a wiped buffer would leave an unwiped copy behind.
    let mut text = Zeroizing::new(String::with_capacity(trimmed.len() + 1));
    text.push_str(trimmed);
    text.push('\n');
    let Ok(request) = Request::from_str(&text) else {
        return errno_answer(libc::EPROTO);
    };
    let is_set = matches!(request, Request::Set(_));
    let mut sets_key = None;
    if let Request::Set(set) = &request {
        sets_key = set.private_key.as_ref().map(|k| k.0 != [0u8; 32]);
        // gotatun panics when a peer is added before any private key (wireguard-go accepts
        // it): refuse such a request instead.
        if !set.peers.is_empty() && sets_key != Some(true) && !shared.has_key() {
            return errno_answer(libc::EINVAL);
        }
    }
    if let Request::Set(set) = &request
        && let Some(port) = set.listen_port
        && port != 0
        && port != shared.port()
        && let Err(e) = shared.prebind(port)
    {
        return errno_answer(e.raw_os_error().unwrap_or(libc::EADDRINUSE));
    }
    let request = match request {
        Request::Set(set) if in_place::applies(&set) => {
            return errno_answer(in_place::apply(set, &handlers.device).await);
        }
        request => request,
    };
    let Ok(response) = client.send(request).await else {
        return errno_answer(libc::EIO);
    };
    if is_set
        && let Response::Set(r) = &response
        && r.errno != 0
        && let Some(e) = shared.take_bind_error()
    {
        return errno_answer(e.raw_os_error().unwrap_or(r.errno));
    }
    // Sized first, so the wiped buffer never grows (growing would leave unwiped copies).
    if let (Some(has), Response::Set(r)) = (sets_key, &response)
        && r.errno == 0
    {
        shared.set_has_key(has);
    }
    let mut count = Count(0);
    let _ = writeln!(count, "{response}");
    let mut answer = Zeroizing::new(String::with_capacity(count.0));
    let _ = writeln!(answer, "{response}");
    answer
}

struct Count(usize);

impl std::fmt::Write for Count {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}
