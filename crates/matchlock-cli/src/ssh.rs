//! `matchlock ssh`: OpenSSH's client through the sandbox's host-side SSH server.

use crate::run::{block_on, until_stopped};
use anyhow::{anyhow, bail, Context, Result};
use matchlock_sandbox::{Client, Store};
use matchlock_ssh::SshServer;
use std::io::IsTerminal;

/// Runs `ssh` against a server started for the call, or serves (`--serve`) until interrupted.
pub fn ssh(id: &str, user: &str, serve: bool, listen: &str, args: &[String]) -> Result<i32> {
    let listen: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| anyhow!("--listen '{listen}' must be IP:PORT, e.g. 127.0.0.1:0"))?;
    if serve && !args.is_empty() {
        bail!("--serve takes no ssh arguments; run the printed command with them instead");
    }
    let store = Store::open_default();
    let id = store.resolve_id(id)?;
    let client = Client::for_sandbox(&store, &id)?;
    let key_dir = store.dir(&id).join("ssh");
    block_on(async move {
        let mut server = SshServer::start(client.clone(), &key_dir, listen, user)
            .await
            .map_err(|e| anyhow!(e))?;
        let access = server.access().clone();
        if serve {
            eprintln!("SSH server for sandbox {id} on {}", access.addr);
            println!("{}", access.command());
            return until_stopped(&client, &id, server.wait(), "the SSH server stopped").await;
        }
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(access.options());
        // A terminal for a shell when there is one to give, as a plain `ssh host` would.
        if args.is_empty() && std::io::stdin().is_terminal() {
            cmd.arg("-t");
        }
        cmd.arg(format!("{}@{}", access.user, access.addr.ip()));
        cmd.args(args);
        let status = cmd
            .status()
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => anyhow!(
                    "the ssh client is not installed (apt-get install openssh-client); \
                     'matchlock exec -it {id} sh' needs none"
                ),
                _ => anyhow!(e),
            })
            .context("running ssh")?;
        drop(server);
        Ok(status.code().unwrap_or(255))
    })
}
