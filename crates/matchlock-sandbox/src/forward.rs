//! Host-side port forwarding: TCP listeners on the host whose connections are relayed to a port on
//! the guest's loopback through the supervisor (a [`matchlock_proto::Msg::Connect`] stream each).
//! Used by `matchlock run -p`, `matchlock port-forward` and the RPC server's `port_forward`.

use crate::client::Client;
use crate::SandboxError;
use matchlock_proto::{read_msg, Msg};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Connections relayed at once per forwarder; more wait in the listen backlog, so a client that
/// opens thousands cannot make the host open thousands of guest streams.
const MAX_CONNECTIONS: usize = 256;

/// One `LOCAL:REMOTE` mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMap {
    /// Host port; 0 picks a free one.
    pub local_port: u16,
    /// Guest port.
    pub remote_port: u16,
}

impl std::str::FromStr for PortMap {
    type Err = String;

    /// Parses `[LOCAL:]REMOTE`; `LOCAL` defaults to `REMOTE`.
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str, what: &str| -> Result<u16, String> {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{what} port '{p}' in '{s}' is not a number from 0 to 65535"))
        };
        let (local, remote) = match s.split_once(':') {
            Some((l, r)) => (port(l, "local")?, port(r, "remote")?),
            None => {
                let r = port(s, "remote")?;
                (r, r)
            }
        };
        if remote == 0 {
            return Err(format!("remote port in '{s}' must be 1 to 65535"));
        }
        Ok(PortMap {
            local_port: local,
            remote_port: remote,
        })
    }
}

/// A listener that is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Host address it listens on.
    pub address: IpAddr,
    /// Host port it listens on.
    pub local_port: u16,
    /// Guest port its connections reach.
    pub remote_port: u16,
}

/// A set of running forwards. Dropping it closes the listeners and the connections in flight.
pub struct Forwarder {
    bindings: Vec<Binding>,
    tasks: JoinSet<()>,
}

impl Forwarder {
    /// Binds one listener per mapping and address, then serves them in the background. Fails
    /// (binding nothing) if any address or port cannot be bound.
    pub async fn start(
        client: Client,
        maps: &[PortMap],
        addresses: &[IpAddr],
    ) -> Result<Forwarder, SandboxError> {
        let pairs: Vec<(PortMap, IpAddr)> = maps
            .iter()
            .flat_map(|m| addresses.iter().map(move |a| (*m, *a)))
            .collect();
        Self::start_pairs(client, &pairs).await
    }

    /// Like [`Forwarder::start`], for explicit (mapping, address) pairs.
    pub async fn start_pairs(
        client: Client,
        pairs: &[(PortMap, IpAddr)],
    ) -> Result<Forwarder, SandboxError> {
        let mut listeners = Vec::new();
        for (map, addr) in pairs {
            let l = TcpListener::bind(SocketAddr::new(*addr, map.local_port))
                .await
                .map_err(|e| {
                    SandboxError::Start(format!(
                        "cannot listen on {} for port {}: {e}",
                        SocketAddr::new(*addr, map.local_port),
                        map.remote_port
                    ))
                })?;
            let port = l.local_addr().map(|a| a.port()).unwrap_or(map.local_port);
            listeners.push((
                l,
                Binding {
                    address: *addr,
                    local_port: port,
                    remote_port: map.remote_port,
                },
            ));
        }
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut tasks = JoinSet::new();
        let mut bindings = Vec::new();
        for (l, b) in listeners {
            bindings.push(b.clone());
            tasks.spawn(serve(l, client.clone(), b.remote_port, limit.clone()));
        }
        Ok(Forwarder { bindings, tasks })
    }

    /// The listeners, in mapping-then-address order.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Serves until every listener fails (normally forever).
    pub async fn wait(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Accepts on `listener` until it is dropped, serving each connection with `serve` in a task of
/// its own, at most `limit` at once (more wait in the listen backlog, so a client that opens
/// thousands cannot make the host hold thousands). Used by every host-side listener of a sandbox:
/// port forwards, the ingress gateway and the SSH server.
pub async fn accept_limited<F, Fut>(listener: TcpListener, limit: Arc<Semaphore>, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let conn = serve(tcp, peer);
                    conns.spawn(async move {
                        let _permit = permit;
                        conn.await;
                    });
                }
                // Out of descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve(l: TcpListener, client: Client, port: u16, limit: Arc<Semaphore>) {
    accept_limited(l, limit, |tcp, _| {
        let client = client.clone();
        async move {
            let _ = relay(client, tcp, port).await;
        }
    })
    .await
}

async fn relay(client: Client, tcp: TcpStream, port: u16) -> Result<(), SandboxError> {
    let _ = tcp.set_nodelay(true);
    let mut stream = client.connect(port).await?;
    match read_msg(&mut stream).await? {
        Some(Msg::Ok) => {}
        Some(Msg::Error(e)) => return Err(SandboxError::Channel(e)),
        other => {
            return Err(SandboxError::Channel(format!(
                "unexpected reply to Connect: {other:?}"
            )))
        }
    }
    let (srd, swr) = stream.into_split();
    let (trd, twr) = tcp.into_split();
    matchlock_proto::relay::relay(srd, swr, trd, twr).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_maps() {
        assert_eq!(
            "8080".parse::<PortMap>(),
            Ok(PortMap {
                local_port: 8080,
                remote_port: 8080
            })
        );
        assert_eq!(
            "18080:80".parse::<PortMap>(),
            Ok(PortMap {
                local_port: 18080,
                remote_port: 80
            })
        );
        assert_eq!("0:80".parse::<PortMap>().map(|m| m.local_port), Ok(0));
        assert!("80:0".parse::<PortMap>().is_err());
        assert!("x:80".parse::<PortMap>().is_err());
        assert!("70000".parse::<PortMap>().is_err());
    }
}
