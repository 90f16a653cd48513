//! SSH egress with host-held credentials: the guest's `ssh` or `git` talks to this proxy, which
//! terminates SSH on the host, decides each command, and runs the allowed ones on the real server
//! over a connection of its own: the server's host key checked against a `known_hosts` file,
//! authentication with the host's ssh-agent or a key file that never enters the guest.
//!
//! - **Guest side**: an SSH server with the proxy's own host key (the guest must trust it for
//!   every host it may reach). The guest has no credentials to give, so it is let in with any
//!   method; what it may do is the policy's call, per command.
//! - **Commands**: only `exec` requests (what git, rsync and scripted ssh use) are passed on, each
//!   checked by [`policy::exec_allowed`]: no shell operators or expansions, then the first
//!   matching `allow:`/`deny:` rule. Shells, terminals, subsystems and forwards are refused.
//! - **Upstream**: one connection per guest connection, opened at the first allowed command (the
//!   caller supplies the TCP stream, after its own network policy); a key that is unknown,
//!   changed or revoked refuses the connection unless unknown keys are explicitly allowed.
//! - **Limits**: at most `max_connections` guest connections at once (more are refused), and
//!   `max_sessions` channels per connection. Every decision is an [`Event`].

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod known_hosts;
pub mod policy;

use crate::known_hosts::HostKeyError;
pub use policy::{Destination, ExecRule};
use russh::client;
/// Key types the proxy's host key is made from.
pub use russh::keys::{ssh_key::private::Ed25519Keypair, PrivateKey};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Handle, Msg as ServerMsg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// How the proxy authenticates upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// The ssh-agent listening on this socket (`$SSH_AUTH_SOCK`).
    Agent(PathBuf),
    /// An unencrypted OpenSSH private key file.
    KeyFile(PathBuf),
}

/// What SSH egress allows and how it logs in.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// Servers that may be reached.
    pub destinations: Vec<Destination>,
    /// The `known_hosts` file upstream keys are checked against.
    pub known_hosts: PathBuf,
    /// Accept a server no `known_hosts` line names (a changed or revoked key never is).
    pub allow_unknown_host_keys: bool,
    /// Upstream credentials.
    pub credential: Credential,
    /// Command rules; empty allows every plain command.
    pub exec_rules: Vec<ExecRule>,
    /// Channels one guest connection may open.
    pub max_sessions: usize,
    /// Guest connections at once.
    pub max_connections: usize,
}

impl EgressConfig {
    /// The proxy's settings from a sandbox's configuration (checked).
    pub fn from_config(c: &matchlock_api::config::SshEgressConfig) -> Result<EgressConfig, String> {
        let destinations = c
            .allow
            .iter()
            .map(|d| d.parse())
            .collect::<Result<Vec<Destination>, _>>()?;
        if destinations.is_empty() {
            return Err("SSH egress needs at least one server (--ssh-allow HOST[:PORT])".into());
        }
        let exec_rules = c
            .exec_rules
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<ExecRule>, _>>()?;
        if c.known_hosts.as_os_str().is_empty() {
            return Err("SSH egress needs a known_hosts file (--ssh-known-hosts FILE)".into());
        }
        let credential = match (&c.agent_socket, &c.key_file) {
            (Some(_), Some(_)) => {
                return Err("SSH egress takes an ssh-agent socket or a key file, not both".into())
            }
            (Some(s), None) => Credential::Agent(s.clone()),
            (None, Some(k)) => Credential::KeyFile(k.clone()),
            (None, None) => {
                return Err(
                    "SSH egress needs credentials: --ssh-key FILE, or an ssh-agent (--ssh-agent SOCKET, or $SSH_AUTH_SOCK)"
                        .into(),
                )
            }
        };
        Ok(EgressConfig {
            destinations,
            known_hosts: c.known_hosts.clone(),
            allow_unknown_host_keys: c.allow_unknown_host_keys,
            credential,
            exec_rules,
            max_sessions: c.sessions(),
            max_connections: c.connections(),
        })
    }
}

/// Checks a sandbox's SSH egress configuration before it starts: the servers and rules parse,
/// one credential is named, and the files it names can be read now.
pub fn check_config(c: &matchlock_api::config::SshEgressConfig) -> Result<(), String> {
    let cfg = EgressConfig::from_config(c)?;
    std::fs::metadata(&cfg.known_hosts)
        .map_err(|e| format!("known_hosts {}: {e}", cfg.known_hosts.display()))?;
    match &cfg.credential {
        Credential::KeyFile(k) => {
            std::fs::metadata(k).map_err(|e| format!("SSH key {}: {e}", k.display()))?;
        }
        Credential::Agent(s) => {
            std::fs::metadata(s).map_err(|e| format!("ssh-agent socket {}: {e}", s.display()))?;
        }
    }
    Ok(())
}

/// One decision, for the sandbox's event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `ssh_exec_allowed`, `ssh_exec_denied`, `ssh_upstream_refused`, `ssh_connection_refused`.
    pub kind: &'static str,
    /// `host:port`.
    pub destination: String,
    /// The command, when there is one.
    pub command: Option<String>,
    /// Why, for refusals.
    pub reason: Option<String>,
}

/// Where events go.
pub type Events = Arc<dyn Fn(Event) + Send + Sync>;

/// The upstream TCP connection, opened when the first command is allowed.
pub type Connect = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;

/// The proxy for one sandbox.
pub struct Egress {
    cfg: Arc<EgressConfig>,
    server: Arc<russh::server::Config>,
    limit: Arc<Semaphore>,
    events: Events,
}

impl Egress {
    /// A proxy with `cfg`, showing guests `host_key`, reporting to `events`.
    pub fn new(cfg: EgressConfig, host_key: PrivateKey, events: Events) -> Egress {
        let server = Arc::new(russh::server::Config {
            keys: vec![host_key],
            auth_rejection_time: Duration::from_millis(100),
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: Some(Duration::from_secs(3600)),
            nodelay: true,
            ..Default::default()
        });
        Egress {
            limit: Arc::new(Semaphore::new(cfg.max_connections.max(1))),
            cfg: Arc::new(cfg),
            server,
            events,
        }
    }

    /// The proxy's public host key (what the guest's `known_hosts` must trust).
    pub fn host_key(&self) -> Option<&PublicKey> {
        self.server.keys.first().map(|k| k.public_key())
    }

    /// Whether `host` on `port` is a destination.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.cfg.destinations.iter().any(|d| d.covers(host, port))
    }

    /// Serves one guest connection meant for `host`:`port` until it ends. `connect` opens the
    /// upstream TCP connection when the first command is allowed.
    pub async fn serve<S>(&self, guest: S, host: &str, port: u16, connect: Connect)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let destination = format!("{host}:{port}");
        let refuse = |reason: String| {
            (self.events)(Event {
                kind: "ssh_connection_refused",
                destination: destination.clone(),
                command: None,
                reason: Some(reason),
            })
        };
        if !self.allows(host, port) {
            return refuse("not an allowed SSH destination".into());
        }
        let Ok(_permit) = self.limit.clone().try_acquire_owned() else {
            return refuse(format!(
                "{} SSH connections are open, the most allowed",
                self.cfg.max_connections
            ));
        };
        let handler = GuestConn {
            cfg: self.cfg.clone(),
            events: self.events.clone(),
            host: host.to_string(),
            port,
            user: String::new(),
            connect: Some(connect),
            upstream: None,
            channels: HashMap::new(),
            opened: 0,
        };
        match russh::server::run_stream(self.server.clone(), guest, handler).await {
            Ok(session) => {
                let _ = session.await;
            }
            Err(e) => refuse(format!("not SSH, or the handshake failed: {e}")),
        }
    }
}

/// The guest's side of one connection.
struct GuestConn {
    cfg: Arc<EgressConfig>,
    events: Events,
    host: String,
    port: u16,
    user: String,
    connect: Option<Connect>,
    upstream: Option<Arc<client::Handle<Upstream>>>,
    /// Where each guest channel's input goes upstream.
    channels: HashMap<ChannelId, russh::ChannelWriteHalf<client::Msg>>,
    opened: usize,
}

impl GuestConn {
    fn event(&self, kind: &'static str, command: Option<&str>, reason: Option<String>) {
        if let Some(r) = &reason {
            tracing::info!(host = %self.host, port = self.port, ?command, "ssh egress: {kind}: {r}");
        }
        (self.events)(Event {
            kind,
            destination: format!("{}:{}", self.host, self.port),
            command: command.map(str::to_string),
            reason,
        });
    }

    /// The upstream connection, opened and authenticated on first use.
    async fn upstream(&mut self) -> Result<Arc<client::Handle<Upstream>>, String> {
        if let Some(h) = &self.upstream {
            return Ok(h.clone());
        }
        let connect = self
            .connect
            .take()
            .ok_or("the connection to the server failed earlier")?;
        let tcp = connect
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        let refused = Arc::new(Mutex::new(None));
        let handler = Upstream {
            known_hosts: self.cfg.known_hosts.clone(),
            allow_unknown: self.cfg.allow_unknown_host_keys,
            host: self.host.clone(),
            port: self.port,
            refused: refused.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: Some(Duration::from_secs(3600)),
            ..Default::default()
        });
        let mut h = client::connect_stream(config, tcp, handler)
            .await
            .map_err(|e| {
                refused
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .unwrap_or_else(|| format!("SSH with {}:{} failed: {e}", self.host, self.port))
            })?;
        authenticate(&mut h, &self.user, &self.cfg.credential).await?;
        let h = Arc::new(h);
        self.upstream = Some(h.clone());
        Ok(h)
    }
}

/// Logs in upstream as `user` with the host's credential.
async fn authenticate(
    h: &mut client::Handle<Upstream>,
    user: &str,
    credential: &Credential,
) -> Result<(), String> {
    let refused = || format!("the server refused the host's credentials for user '{user}'");
    match credential {
        Credential::KeyFile(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the SSH key {}: {e}", path.display()))?;
            let key = PrivateKey::from_openssh(text.as_bytes())
                .map_err(|e| format!("{} is not an OpenSSH private key: {e}", path.display()))?;
            if key.is_encrypted() {
                return Err(format!(
                    "{} is encrypted; load it into an ssh-agent and use the agent instead",
                    path.display()
                ));
            }
            let hash = h.best_supported_rsa_hash().await.ok().flatten().flatten();
            let ok = h
                .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                .await
                .map_err(|e| e.to_string())?;
            if ok.success() {
                Ok(())
            } else {
                Err(refused())
            }
        }
        Credential::Agent(socket) => {
            let mut agent = russh::keys::agent::client::AgentClient::connect_uds(socket)
                .await
                .map_err(|e| format!("cannot reach the ssh-agent at {}: {e}", socket.display()))?;
            let ids = agent
                .request_identities()
                .await
                .map_err(|e| format!("the ssh-agent: {e}"))?;
            let hash = h.best_supported_rsa_hash().await.ok().flatten().flatten();
            for id in ids {
                let key = id.public_key().into_owned();
                if let Ok(r) = h
                    .authenticate_publickey_with(user, key, hash, &mut agent)
                    .await
                {
                    if r.success() {
                        return Ok(());
                    }
                }
            }
            Err(refused())
        }
    }
}

/// The upstream connection's handler: the host key check.
struct Upstream {
    known_hosts: PathBuf,
    allow_unknown: bool,
    host: String,
    port: u16,
    refused: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Upstream {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                "the server offered a host certificate; only plain host keys are checked".into(),
            );
            return Ok(false);
        };
        match known_hosts::check(&self.known_hosts, &self.host, self.port, key) {
            Ok(()) => Ok(true),
            Err(HostKeyError::Unknown { .. }) if self.allow_unknown => {
                tracing::warn!(host = %self.host, "ssh egress: accepting an unknown host key, as configured");
                Ok(true)
            }
            Err(e) => {
                *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                Ok(false)
            }
        }
    }
}

/// Tells the guest why, then ends its channel.
async fn refuse_command(handle: Handle, ch: ChannelId, why: String, code: u32) {
    let _ = handle
        .extended_data(ch, 1, format!("matchlock: {why}\r\n").into_bytes())
        .await;
    let _ = handle.exit_status_request(ch, code).await;
    let _ = handle.eof(ch).await;
    let _ = handle.close(ch).await;
}

/// Relays the upstream channel's output and exit to the guest's channel.
async fn relay(mut up: russh::ChannelReadHalf, handle: Handle, ch: ChannelId) {
    while let Some(msg) = up.wait().await {
        let sent = match msg {
            ChannelMsg::Data { data } => handle.data(ch, data).await.is_ok(),
            ChannelMsg::ExtendedData { data, ext } => {
                handle.extended_data(ch, ext, data).await.is_ok()
            }
            ChannelMsg::ExitStatus { exit_status } => {
                handle.exit_status_request(ch, exit_status).await.is_ok()
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => handle
                .exit_signal_request(ch, signal_name, core_dumped, error_message, lang_tag)
                .await
                .is_ok(),
            ChannelMsg::Eof => handle.eof(ch).await.is_ok(),
            ChannelMsg::Failure => {
                let _ = handle
                    .extended_data(
                        ch,
                        1,
                        b"matchlock: the server refused the command\r\n".to_vec(),
                    )
                    .await;
                let _ = handle.exit_status_request(ch, 255).await;
                false
            }
            ChannelMsg::Close => false,
            _ => true,
        };
        if !sent {
            break;
        }
    }
    let _ = handle.eof(ch).await;
    let _ = handle.close(ch).await;
}

impl russh::server::Handler for GuestConn {
    type Error = russh::Error;

    // The guest holds no credentials; whatever it offers, it is in. The name it gives is the
    // upstream user (`git@host`).
    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.user = user.to_string();
        Ok(Auth::Accept)
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        self.user = user.to_string();
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.user = user.to_string();
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<ServerMsg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.opened >= self.cfg.max_sessions {
            self.event(
                "ssh_exec_denied",
                None,
                Some(format!(
                    "more than {} sessions on one connection",
                    self.cfg.max_sessions
                )),
            );
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        self.opened += 1;
        drop(channel);
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        let handle = session.handle();
        if self.channels.contains_key(&channel) {
            return session.channel_failure(channel);
        }
        if let Err(why) = policy::exec_allowed(&self.cfg.exec_rules, &command) {
            self.event("ssh_exec_denied", Some(&command), Some(why.clone()));
            session.channel_success(channel)?;
            tokio::spawn(refuse_command(
                handle,
                channel,
                format!("SSH command refused: {why}"),
                1,
            ));
            return Ok(());
        }
        let opened = async {
            let up = self.upstream().await?;
            let ch = up
                .channel_open_session()
                .await
                .map_err(|e| format!("the server would not open a session: {e}"))?;
            ch.exec(true, command.as_bytes())
                .await
                .map_err(|e| format!("the server would not run the command: {e}"))?;
            Ok::<_, String>(ch)
        }
        .await;
        match opened {
            Ok(ch) => {
                self.event("ssh_exec_allowed", Some(&command), None);
                let (rd, wr) = ch.split();
                self.channels.insert(channel, wr);
                session.channel_success(channel)?;
                tokio::spawn(relay(rd, handle, channel));
            }
            Err(why) => {
                self.event("ssh_upstream_refused", Some(&command), Some(why.clone()));
                session.channel_success(channel)?;
                tokio::spawn(refuse_command(handle, channel, why, 255));
            }
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(w) = self.channels.get(&channel) {
            let _ = w.data_bytes(data.to_vec()).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(w) = self.channels.get(&channel) {
            let _ = w.eof().await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(w) = self.channels.remove(&channel) {
            let _ = w.close().await;
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.event(
            "ssh_exec_denied",
            None,
            Some("interactive shells are not passed on".into()),
        );
        session.channel_success(channel)?;
        tokio::spawn(refuse_command(
            session.handle(),
            channel,
            "SSH egress passes on commands only, not shells".into(),
            1,
        ));
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.event(
            "ssh_exec_denied",
            None,
            Some(format!("the {name} subsystem is not passed on")),
        );
        session.channel_failure(channel)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<ServerMsg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.event(
            "ssh_exec_denied",
            None,
            Some(format!("a forward to {host}:{port} is not passed on")),
        );
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }
}
