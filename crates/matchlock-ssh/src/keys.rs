//! A sandbox's SSH key material, made on first use and kept with its state (so `matchlock rm`
//! removes it): the server's host key, the one client key allowed to log in, and a
//! `known_hosts` file that pins the host key under an alias, so `ssh` verifies the server
//! whatever port it listens on this time.

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{PrivateKey, PublicKey};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The key files of one sandbox.
pub struct Keys {
    /// The server's host key.
    pub host: PrivateKey,
    /// The public half of the only key that may log in.
    pub authorized: PublicKey,
    /// The client's private key (OpenSSH format, mode 0600).
    pub identity_file: PathBuf,
    /// `known_hosts` with the host key under [`Keys::alias`].
    pub known_hosts: PathBuf,
    /// The name `ssh` checks the host key under (`HostKeyAlias`).
    pub alias: String,
}

fn random_key() -> PrivateKey {
    use rand::RngCore;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

/// Writes `data` to `path` with `mode`, replacing it through a temporary file, so a reader never
/// sees half a key and the mode holds from the first byte.
fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn load_or_make(path: &Path) -> Result<PrivateKey, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(text.as_bytes()).map_err(|e| {
            format!(
                "{} is not an OpenSSH private key ({e}); remove it to make a new one",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = random_key();
            let text = key
                .to_openssh(LineEnding::LF)
                .map_err(|e| format!("cannot encode a key: {e}"))?;
            write_private(path, text.as_bytes(), 0o600)?;
            Ok(key)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

impl Keys {
    /// Loads the keys in `dir` (created, mode 0700), making what is missing. `alias` names the
    /// sandbox in `known_hosts`.
    pub fn load_or_create(dir: &Path, alias: &str) -> Result<Keys, String> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let host = load_or_make(&dir.join("host_key"))?;
        let identity_file = dir.join("id_ed25519");
        let client = load_or_make(&identity_file)?;
        let known_hosts = dir.join("known_hosts");
        let host_line = host
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode a key: {e}"))?;
        write_private(
            &known_hosts,
            format!("{alias} {host_line}\n").as_bytes(),
            0o644,
        )?;
        Ok(Keys {
            host,
            authorized: client.public_key().clone(),
            identity_file,
            known_hosts,
            alias: alias.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ssh");
        let a = Keys::load_or_create(&d, "matchlock-vm-1").unwrap();
        let b = Keys::load_or_create(&d, "matchlock-vm-1").unwrap();
        assert_eq!(a.host.public_key(), b.host.public_key());
        assert_eq!(a.authorized, b.authorized);
        assert_ne!(a.host.public_key(), &a.authorized);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&a.identity_file), 0o600);
        assert_eq!(mode(&d.join("host_key")), 0o600);
        assert_eq!(mode(&d), 0o700);
        let kh = std::fs::read_to_string(&a.known_hosts).unwrap();
        assert!(kh.starts_with("matchlock-vm-1 ssh-ed25519 "), "{kh}");
        // A damaged key is an error that says what to do, not a new key silently.
        std::fs::write(d.join("host_key"), "junk").unwrap();
        let e = Keys::load_or_create(&d, "x").err().unwrap();
        assert!(e.contains("remove it"), "{e}");
    }
}
