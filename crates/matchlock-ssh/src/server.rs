//! The SSH server: russh does the protocol; each session channel becomes one exec on the
//! sandbox's channel (a terminal when the client asked for a pty), each `direct-tcpip`
//! channel one connection to the guest's loopback (`ssh -L`), and each `tcpip-forward` request
//! a listener on the guest's loopback whose connections come back as `forwarded-tcpip`
//! channels (`ssh -R`).

use matchlock_proto::{read_msg, write_msg, Msg, WinSize};
use matchlock_sandbox::control::ExecSpec;
use matchlock_sandbox::Client;
use russh::keys::PublicKey;
use russh::server::{
    Auth, ChannelOpenHandle, Handle, Msg as ServerMsg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty, Sig};
use std::collections::HashMap;
use tokio::sync::mpsc;

/// What the client sends to a running command.
enum Input {
    Data(Vec<u8>),
    Eof,
    Resize(WinSize),
    Signal(i32),
}

/// A session channel: what the client asked for before its command, then the command's input.
#[derive(Default)]
struct Chan {
    tty: Option<WinSize>,
    env: Vec<(String, String)>,
    input: Option<mpsc::Sender<Input>>,
}

/// One client connection.
pub struct Conn {
    pub(crate) client: Client,
    pub(crate) authorized: PublicKey,
    pub(crate) peer: Option<std::net::SocketAddr>,
    pub(crate) user: String,
    chans: HashMap<ChannelId, Chan>,
    /// `ssh -R` listeners by the address and port the client asked for.
    forwards: HashMap<(String, u32), tokio::task::JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The client went away: its listeners in the guest go with it.
        for (_, task) in self.forwards.drain() {
            task.abort();
        }
    }
}

impl Conn {
    pub(crate) fn new(
        client: Client,
        authorized: PublicKey,
        peer: Option<std::net::SocketAddr>,
    ) -> Conn {
        Conn {
            client,
            authorized,
            peer,
            user: String::new(),
            chans: HashMap::new(),
            forwards: HashMap::new(),
        }
    }

    fn is_authorized(&self, key: &PublicKey) -> bool {
        key.key_data() == self.authorized.key_data()
    }

    /// Starts `argv` for `channel` and acknowledges the request.
    fn start(
        &mut self,
        channel: ChannelId,
        argv: Vec<String>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let chan = self.chans.entry(channel).or_default();
        if chan.input.is_some() {
            // One command per channel (RFC 4254 §6.5).
            return session.channel_failure(channel);
        }
        let (tx, rx) = mpsc::channel(64);
        chan.input = Some(tx);
        let mut env = chan.env.clone();
        if chan.tty.is_none() {
            env.retain(|(k, _)| k != "TERM");
        }
        let spec = ExecSpec {
            argv,
            env,
            cwd: None,
            // `root@` and the like pick the guest user; an empty name, the image's own.
            user: (!self.user.is_empty()).then(|| self.user.clone()),
            tty: chan.tty,
            stdin: true,
            log: false,
        };
        tracing::info!(user = %self.user, argv = ?spec.argv, tty = spec.tty.is_some(), "ssh: exec");
        tokio::spawn(run(
            self.client.clone(),
            spec,
            channel,
            session.handle(),
            rx,
        ));
        session.channel_success(channel)
    }

    async fn send(&mut self, channel: ChannelId, input: Input) {
        let tx = self.chans.get(&channel).and_then(|c| c.input.clone());
        if let Some(tx) = tx {
            // Waits while the command does not read: back-pressure onto the client's window.
            let _ = tx.send(input).await;
        }
    }
}

/// Runs one command and relays it to the channel until it exits; then the exit status, EOF and
/// close, as `sshd` does.
async fn run(
    client: Client,
    spec: ExecSpec,
    ch: ChannelId,
    handle: Handle,
    mut input: mpsc::Receiver<Input>,
) {
    let s = match client.exec(spec).await {
        Ok(s) => s,
        Err(e) => {
            let _ = handle
                .extended_data(ch, 1, format!("matchlock: {e}\r\n").into_bytes())
                .await;
            finish(&handle, ch, 255, None).await;
            return;
        }
    };
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        while let Some(i) = input.recv().await {
            let m = match i {
                Input::Data(d) => Msg::Stdin(d),
                Input::Eof => Msg::StdinEof,
                Input::Resize(w) => Msg::Resize(w),
                Input::Signal(s) => Msg::Signal(s),
            };
            if write_msg(&mut wr, &m).await.is_err() {
                break;
            }
        }
        // Dropping the channel's input keeps the stream open: the guest ends the process,
        // not the host, unless the client goes away (then the read side ends too).
        std::future::pending::<()>().await;
    });
    let (mut code, mut signal) = (255, None);
    loop {
        match read_msg(&mut rd).await {
            Ok(Some(Msg::Stdout(d))) => {
                if handle.data(ch, d).await.is_err() {
                    break;
                }
            }
            Ok(Some(Msg::Stderr(d))) => {
                if handle.extended_data(ch, 1, d).await.is_err() {
                    break;
                }
            }
            Ok(Some(Msg::Error(e))) => {
                let _ = handle
                    .extended_data(ch, 1, format!("{e}\r\n").into_bytes())
                    .await;
            }
            Ok(Some(Msg::Exited(st))) => {
                code = st.code;
                signal = st.signal;
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    writer.abort();
    finish(&handle, ch, code, signal).await;
}

async fn finish(handle: &Handle, ch: ChannelId, code: i32, signal: Option<i32>) {
    match signal.and_then(sig) {
        Some(s) => {
            let _ = handle
                .exit_signal_request(ch, s, false, String::new(), String::new())
                .await;
        }
        None => {
            let _ = handle
                .exit_status_request(ch, code.clamp(0, 255) as u32)
                .await;
        }
    }
    let _ = handle.eof(ch).await;
    let _ = handle.close(ch).await;
}

fn sig(n: i32) -> Option<Sig> {
    Some(match n {
        1 => Sig::HUP,
        2 => Sig::INT,
        3 => Sig::QUIT,
        4 => Sig::ILL,
        6 => Sig::ABRT,
        8 => Sig::FPE,
        9 => Sig::KILL,
        10 => Sig::USR1,
        11 => Sig::SEGV,
        13 => Sig::PIPE,
        14 => Sig::ALRM,
        15 => Sig::TERM,
        _ => return None,
    })
}

fn signum(s: &Sig) -> Option<i32> {
    Some(match s {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(_) => return None,
    })
}

fn winsize(cols: u32, rows: u32) -> WinSize {
    WinSize {
        rows: rows.clamp(1, u16::MAX as u32) as u16,
        cols: cols.clamp(1, u16::MAX as u32) as u16,
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.is_authorized(offer.public_key) {
            Ok(Auth::Accept)
        } else {
            tracing::warn!(peer = ?self.peer, user, "ssh: refused a key that is not the sandbox's");
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.is_authorized(key.public_key) {
            return Ok(Auth::reject());
        }
        self.user = user.to_string();
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<ServerMsg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.chans.len() >= crate::MAX_CHANNELS {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        // The channel's own queue is not read: requests and data come through this handler.
        self.chans.insert(channel.id(), Chan::default());
        drop(channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the input ends the writer; the exec stream goes with its task.
        self.chans.remove(&channel);
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Input::Eof).await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Input::Data(data.to_vec())).await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let chan = self.chans.entry(channel).or_default();
        chan.tty = Some(winsize(cols, rows));
        chan.env.retain(|(k, _)| k != "TERM");
        if !term.is_empty() && term.len() < 64 {
            chan.env.push(("TERM".into(), term.to_string()));
        }
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let chan = self.chans.entry(channel).or_default();
        // Bounded, as sshd's AcceptEnv would be: a client cannot grow the host's memory.
        if chan.env.len() < 64
            && !name.is_empty()
            && !name.contains('=')
            && name.len() + value.len() < 4096
        {
            chan.env.push((name.to_string(), value.to_string()));
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, vec!["/bin/sh".into(), "-l".into()], session)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.start(
            channel,
            vec!["/bin/sh".into(), "-c".into(), command],
            session,
        )
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name != "sftp" {
            return session.channel_failure(channel);
        }
        // The agent's own SFTP server, as this user: every image has it, and the guest kernel
        // checks each file access as it does the user's programs'.
        let argv = matchlock_proto::SFTP_SERVER_ARGV.map(String::from).to_vec();
        self.start(channel, argv, session)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.send(channel, Input::Resize(winsize(cols, rows))).await;
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(n) = signum(&signal) {
            self.send(channel, Input::Signal(n)).await;
        }
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<ServerMsg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // `ssh -L` reaches the sandbox's own loopback, nothing beyond it: the guest's way out
        // is its network policy, not this server.
        let loopback = matches!(host, "localhost" | "127.0.0.1" | "::1" | "[::1]");
        let port = u16::try_from(port).ok().filter(|p| *p != 0);
        let (true, Some(port)) = (loopback, port) else {
            tracing::warn!(
                host,
                port,
                "ssh: refused a forward that is not to the sandbox's loopback"
            );
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        match self.client.connect_bytes(port).await {
            Ok(mut guest) => {
                reply.accept().await;
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut guest).await;
                });
            }
            Err(e) => {
                tracing::info!(port, "ssh: forward refused: {e}");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // As sshd with `GatewayPorts no`: whatever address is asked for, the listener is on the
        // sandbox's loopback. Ports below 1024 only for root, as sshd allows them.
        let Ok(wanted) = u16::try_from(*port) else {
            return Ok(false);
        };
        let root = matches!(self.user.as_str(), "root" | "0");
        if (wanted != 0 && wanted < 1024 && !root) || self.forwards.len() >= crate::MAX_CHANNELS {
            tracing::warn!(port = wanted, user = %self.user, "ssh: refused a remote forward");
            return Ok(false);
        }
        if self.forwards.contains_key(&(address.to_string(), *port)) {
            return Ok(false);
        }
        let mut listener = match self.client.listen(wanted).await {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(port = wanted, "ssh: remote forward refused: {e}");
                return Ok(false);
            }
        };
        let bound = listener.port();
        if wanted == 0 {
            // The client learns the port chosen from the reply, and matches channels on it.
            *port = bound.into();
        }
        tracing::info!(address, port = bound, "ssh: remote forward");
        let handle = session.handle();
        let connected_address = address.to_string();
        let connected_port = *port;
        let task = tokio::spawn(async move {
            while let Ok(mut guest) = listener.accept().await {
                let opened = handle
                    .channel_open_forwarded_tcpip(
                        connected_address.clone(),
                        connected_port,
                        "127.0.0.1",
                        0,
                    )
                    .await;
                let Ok(channel) = opened else {
                    // The client refused this one (e.g. nothing listens on its side); the
                    // guest's peer sees its connection closed.
                    continue;
                };
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut guest).await;
                });
            }
        });
        self.forwards.insert((address.to_string(), *port), task);
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match self.forwards.remove(&(address.to_string(), port)) {
            Some(task) => {
                task.abort();
                Ok(true)
            }
            None => Ok(false),
        }
    }
}
