//! SSH egress against real OpenSSH: an `sshd` on loopback that only the host's key can log into
//! (started here, as root, like the other real peers the tests start), a bare git repository
//! behind it, and the real `git` and `ssh` clients on the guest's side of the proxy holding no
//! key at all. The proxy's guest side listens on loopback here; in a sandbox it is fed the
//! guest's TCP flows.

use matchlock_ssh_egress::{Credential, Egress, EgressConfig, Event};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::PrivateKey;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn keygen(path: &Path) {
    sh(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path));
}

/// A real sshd on 127.0.0.1 accepting only `user_key` for root, and a bare repository.
struct Upstream {
    dir: tempfile::TempDir,
    sshd: Child,
    port: u16,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

impl Upstream {
    fn start() -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("user_key"));
        std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {0}/host_key\n\
                 AuthorizedKeysFile {0}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n",
                d.display()
            ),
        )
        .unwrap();
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/sbin/sshd (apt-get install openssh-server)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A repository with one commit.
        let git = |args: &[&str], cwd: &Path| {
            sh(Command::new("git")
                .args([
                    "-c",
                    "user.email=t@test",
                    "-c",
                    "user.name=t",
                    "-c",
                    "init.defaultBranch=main",
                ])
                .args(args)
                .current_dir(cwd))
        };
        std::fs::create_dir(d.join("work")).unwrap();
        git(&["init", "-q"], &d.join("work"));
        std::fs::write(d.join("work/README"), "from the real server\n").unwrap();
        git(&["add", "README"], &d.join("work"));
        git(&["commit", "-q", "-m", "first"], &d.join("work"));
        std::fs::create_dir(d.join("srv")).unwrap();
        git(
            &["clone", "-q", "--bare", "../work", "repo.git"],
            &d.join("srv"),
        );
        Upstream { dir, sshd, port }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// known_hosts naming the server as `git.test` on its port, with `key_file`'s public key.
    fn known_hosts(&self, key_file: &str) -> PathBuf {
        let pubkey = std::fs::read_to_string(self.path(key_file)).unwrap();
        let out = self.path(&format!("known_hosts-{key_file}"));
        std::fs::write(&out, format!("[git.test]:{} {pubkey}", self.port)).unwrap();
        out
    }

    fn config(&self, known_hosts: PathBuf, credential: Credential) -> EgressConfig {
        EgressConfig {
            destinations: vec![format!("git.test:{}", self.port).parse().unwrap()],
            known_hosts,
            allow_unknown_host_keys: false,
            credential,
            exec_rules: vec![
                "deny:git-receive-pack *".parse().unwrap(),
                format!(
                    "allow:git-upload-pack '{}/srv/*.git'",
                    self.dir.path().display()
                )
                .parse()
                .unwrap(),
            ],
            max_sessions: 4,
            max_connections: 4,
        }
    }
}

/// The proxy's guest side on loopback, for connections to `git.test`; the events it reported.
async fn proxy(up: &Upstream, cfg: EgressConfig) -> (u16, Arc<Mutex<Vec<Event>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&[9; 32]));
    let egress = Arc::new(Egress::new(
        cfg,
        key,
        Arc::new(move |e| sink.lock().unwrap().push(e)),
    ));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let upstream = up.port;
    tokio::spawn(async move {
        loop {
            let (guest, _) = l.accept().await.unwrap();
            let egress = egress.clone();
            tokio::spawn(async move {
                let connect = Box::pin(TcpStream::connect(("127.0.0.1", upstream)));
                egress.serve(guest, "git.test", upstream, connect).await;
            });
        }
    });
    (port, events)
}

/// `ssh` options of a guest: no key, no agent, any host key (the guest trusts the proxy).
fn guest_ssh(home: &Path) -> String {
    format!(
        "ssh -F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
         -o IdentitiesOnly=yes -o IdentityFile={}/none -o IdentityAgent=none -o BatchMode=yes \
         -o LogLevel=ERROR",
        home.display()
    )
}

/// `git clone` through the proxy, as the guest would run it.
async fn clone(up: &Upstream, proxy_port: u16, into: &str) -> Output {
    let home = up.path("guest-home");
    std::fs::create_dir_all(&home).unwrap();
    let url = format!(
        "ssh://root@127.0.0.1:{proxy_port}{}/srv/repo.git",
        up.dir.path().display()
    );
    let dest = up.path(into);
    let ssh = guest_ssh(&home);
    tokio::task::spawn_blocking(move || {
        Command::new("git")
            .args(["clone", "-q", &url])
            .arg(&dest)
            .env("HOME", &home)
            .env("GIT_SSH_COMMAND", ssh)
            .env_remove("SSH_AUTH_SOCK")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn kinds(events: &Mutex<Vec<Event>>) -> Vec<&'static str> {
    events.lock().unwrap().iter().map(|e| e.kind).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn git_clone_with_the_hosts_key_and_commands_decided() {
    let up = Upstream::start();
    let kh = up.known_hosts("host_key.pub");
    let (port, events) = proxy(&up, up.config(kh, Credential::KeyFile(up.path("user_key")))).await;
    let out = clone(&up, port, "clone1").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(up.path("clone1/README")).unwrap(),
        "from the real server\n"
    );
    assert!(
        kinds(&events).contains(&"ssh_exec_allowed"),
        "{:?}",
        events.lock().unwrap()
    );

    // A push (git-receive-pack) is denied by rule, other commands by having no rule, shell
    // tricks whatever the rules say; the guest is told why.
    let home = up.path("guest-home");
    for (cmd, why) in [
        (
            format!(
                "git-receive-pack '{}/srv/repo.git'",
                up.dir.path().display()
            ),
            "deny:git-receive-pack",
        ),
        ("id".to_string(), "no exec rule allows it"),
        (
            format!(
                "git-upload-pack '{}/srv/repo.git'; id",
                up.dir.path().display()
            ),
            "shell operator",
        ),
    ] {
        let ssh = guest_ssh(&home);
        let out = tokio::task::spawn_blocking(move || {
            Command::new("sh")
                .arg("-c")
                .arg(format!("{ssh} -p {port} root@127.0.0.1 \"$0\"",))
                .arg(&cmd)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("SSH command refused") && err.contains(why),
            "{err}"
        );
    }
    assert_eq!(
        kinds(&events)
            .iter()
            .filter(|k| **k == "ssh_exec_denied")
            .count(),
        3
    );

    // Through the host's ssh-agent instead of a key file.
    let agent_sock = up.path("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&agent_sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if agent_sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sh(Command::new("ssh-add")
        .arg(up.path("user_key"))
        .env("SSH_AUTH_SOCK", &agent_sock));
    let kh = up.known_hosts("host_key.pub");
    let (port, _) = proxy(&up, up.config(kh, Credential::Agent(agent_sock.clone()))).await;
    let out = clone(&up, port, "clone2").await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(up.path("clone2/README").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_or_changed_host_keys_and_wrong_credentials_are_refused() {
    let up = Upstream::start();
    let key = Credential::KeyFile(up.path("user_key"));
    // No line for the server.
    let empty = up.path("known_hosts-empty");
    std::fs::write(&empty, "").unwrap();
    let (port, events) = proxy(&up, up.config(empty.clone(), key.clone())).await;
    let out = clone(&up, port, "c-unknown").await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not in known_hosts"), "{err}");
    assert!(kinds(&events).contains(&"ssh_upstream_refused"));
    // ... accepted only when explicitly allowed.
    let mut cfg = up.config(empty, key.clone());
    cfg.allow_unknown_host_keys = true;
    let (port, _) = proxy(&up, cfg).await;
    let out = clone(&up, port, "c-allowed").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another key for the server: refused even with unknown keys allowed.
    let changed = up.known_hosts("user_key.pub");
    let mut cfg = up.config(changed, key);
    cfg.allow_unknown_host_keys = true;
    let (port, _) = proxy(&up, cfg).await;
    let out = clone(&up, port, "c-changed").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not the one in known_hosts"),
        "{err}"
    );

    // A credential the server does not accept.
    keygen(&up.path("other_key"));
    let kh = up.known_hosts("host_key.pub");
    let (port, _) = proxy(
        &up,
        up.config(kh, Credential::KeyFile(up.path("other_key"))),
    )
    .await;
    let out = clone(&up, port, "c-cred").await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refused the host's credentials"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn caps_and_traffic_that_is_not_ssh() {
    let up = Upstream::start();
    let kh = up.known_hosts("host_key.pub");
    let mut cfg = up.config(kh, Credential::KeyFile(up.path("user_key")));
    cfg.max_connections = 1;
    let (port, events) = proxy(&up, cfg).await;
    // One connection that never finishes its handshake holds the only slot.
    let mut held = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = clone(&up, port, "c-capped").await;
    assert!(!out.status.success());
    let refused: Vec<Event> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.kind == "ssh_connection_refused")
        .cloned()
        .collect();
    assert!(
        refused.iter().any(|e| e
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("the most allowed")),
        "{refused:?}"
    );
    // Garbage instead of SSH: refused and reported, and the slot comes back.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    held.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), held.read_to_end(&mut buf)).await;
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        events.lock().unwrap().iter().any(|e| e
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("not SSH")),
        "{:?}",
        events.lock().unwrap()
    );
    let out = clone(&up, port, "c-after").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
