//! SSH access into a Matchlock sandbox, with no `sshd` in the image.
//!
//! A host-side SSH server ([russh]) listens on loopback (unless asked otherwise) and bridges each
//! session onto the sandbox's own channel: `ssh ID cmd` is an exec, `ssh -t` and a bare `ssh` a
//! terminal (with resizes and signals), `ssh -L` a connection to the sandbox's loopback, `ssh -R`
//! a listener on it, and the `sftp` subsystem the guest agent's own SFTP server, run as the SSH
//! user (so every image has one).
//!
//! Only one key may log in: a per-sandbox client key made on first use and kept in the sandbox's
//! state directory (`ssh/id_ed25519`, mode 0600), next to the server's host key and a
//! `known_hosts` that pins it under the alias `matchlock-<id>`, so the printed `ssh` command
//! checks the server strictly, whatever port it got. The SSH user name is the guest user the
//! commands run as.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod keys;
mod server;

pub use keys::Keys;

use matchlock_sandbox::forward::accept_limited;
use matchlock_sandbox::Client;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Client connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Channels one connection may have open at once.
pub(crate) const MAX_CHANNELS: usize = 64;

/// How to reach a running server with OpenSSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Where the server listens.
    pub addr: SocketAddr,
    /// The user to log in as (the guest user commands run as).
    pub user: String,
    /// The private key to log in with.
    pub identity_file: PathBuf,
    /// The `known_hosts` file that pins the server's key.
    pub known_hosts: PathBuf,
    /// The name the host key is pinned under.
    pub host_alias: String,
}

impl Access {
    /// `ssh`'s options and destination (without the program name): strict host key checking
    /// against the sandbox's own `known_hosts`, only the sandbox's key.
    pub fn ssh_args(&self) -> Vec<String> {
        let mut a = self.options();
        a.push(format!("{}@{}", self.user, self.addr.ip()));
        a
    }

    /// The options alone (for `scp` and `sftp`, which take the port as `-P`).
    pub fn options(&self) -> Vec<String> {
        let o = |k: &str, v: &str| ["-o".to_string(), format!("{k}={v}")];
        let mut a = vec!["-i".to_string(), self.identity_file.display().to_string()];
        a.extend(o("Port", &self.addr.port().to_string()));
        a.extend(o("IdentitiesOnly", "yes"));
        a.extend(o("IdentityAgent", "none"));
        a.extend(o(
            "UserKnownHostsFile",
            &self.known_hosts.display().to_string(),
        ));
        a.extend(o("GlobalKnownHostsFile", "/dev/null"));
        a.extend(o("HostKeyAlias", &self.host_alias));
        a.extend(o("StrictHostKeyChecking", "yes"));
        a.extend(o("LogLevel", "ERROR"));
        a
    }

    /// A ready `ssh` command line (shell-quoted).
    pub fn command(&self) -> String {
        let mut words = vec!["ssh".to_string()];
        words.extend(self.ssh_args());
        words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
    }
}

/// Quotes a word for POSIX shells when it needs it.
fn quote(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// A running SSH server for one sandbox; dropping it closes the listener and every session.
pub struct SshServer {
    access: Access,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SshServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SshServer {
    /// Listens on `listen` for the sandbox `client` reaches, with the keys in `key_dir` (made
    /// on first use); `user` goes into [`Access`].
    pub async fn start(
        client: Client,
        key_dir: &std::path::Path,
        listen: SocketAddr,
        user: &str,
    ) -> Result<SshServer, String> {
        let keys = Keys::load_or_create(key_dir, &format!("matchlock-{}", client.id()))?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let config = Arc::new(russh::server::Config {
            keys: vec![keys.host.clone()],
            auth_rejection_time: Duration::from_millis(500),
            auth_rejection_time_initial: Some(Duration::ZERO),
            max_auth_attempts: 6,
            nodelay: true,
            ..Default::default()
        });
        let access = Access {
            addr,
            user: user.to_string(),
            identity_file: keys.identity_file.clone(),
            known_hosts: keys.known_hosts.clone(),
            host_alias: keys.alias.clone(),
        };
        let task = tokio::spawn(serve(listener, config, client, keys.authorized));
        Ok(SshServer { access, task })
    }

    /// How to reach it.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Serves until the listener fails (normally forever).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

async fn serve(
    listener: TcpListener,
    config: Arc<russh::server::Config>,
    client: Client,
    authorized: russh::keys::PublicKey,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    accept_limited(listener, limit, |tcp, peer| {
        let handler = server::Conn::new(client.clone(), authorized.clone(), Some(peer));
        let config = config.clone();
        async move {
            match russh::server::run_stream(config, tcp, handler).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::info!(%peer, "ssh: session ended: {e}");
                    }
                }
                // Not SSH, or a handshake that failed: refused, and logged.
                Err(e) => tracing::warn!(%peer, "ssh: refused a connection: {e}"),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_quoted_and_strict() {
        let a = Access {
            addr: "127.0.0.1:2222".parse().unwrap(),
            user: "root".into(),
            identity_file: "/tmp/my keys/id".into(),
            known_hosts: "/tmp/kh".into(),
            host_alias: "matchlock-vm-1".into(),
        };
        let c = a.command();
        assert!(
            c.starts_with("ssh -i '/tmp/my keys/id' -o Port=2222 "),
            "{c}"
        );
        assert!(c.contains("-o StrictHostKeyChecking=yes"), "{c}");
        assert!(c.contains("-o HostKeyAlias=matchlock-vm-1"), "{c}");
        assert!(c.ends_with(" root@127.0.0.1"), "{c}");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }
}
