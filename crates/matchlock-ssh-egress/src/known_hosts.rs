//! Checking an upstream server's host key against an OpenSSH `known_hosts` file, for SSH egress
//! (the host connecting out on the guest's behalf must refuse a server it cannot verify).
//!
//! ssh-key parses the file; matching follows `sshd(8)`'s "SSH_KNOWN_HOSTS FILE FORMAT": comma
//! lists of patterns with `*` and `?`, `!` negation (a negated match rules the line out),
//! `[host]:port` for ports other than 22, hashed names (`|1|salt|hash`, HMAC-SHA1), and
//! `@revoked` keys, which are refused even when another line accepts them. `@cert-authority` lines
//! are not used (host certificates are not accepted), and a line that does not parse is skipped,
//! as OpenSSH does.

use russh::keys::ssh_key::known_hosts::{HostPatterns, KnownHosts, Marker};
use russh::keys::PublicKey;

/// Why a host key is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyError {
    /// No line names the host.
    Unknown {
        /// `host` or `[host]:port`.
        host: String,
        /// The key's SHA-256 fingerprint.
        fingerprint: String,
    },
    /// Lines name the host, with other keys.
    Mismatch {
        /// `host` or `[host]:port`.
        host: String,
        /// The key's SHA-256 fingerprint.
        fingerprint: String,
    },
    /// The key is marked `@revoked`.
    Revoked {
        /// The key's SHA-256 fingerprint.
        fingerprint: String,
    },
    /// The file cannot be read.
    Unreadable(String),
}

impl std::fmt::Display for HostKeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostKeyError::Unknown { host, fingerprint } => write!(
                f,
                "{host} is not in known_hosts (its key is {fingerprint}); add it there, or allow unknown host keys"
            ),
            HostKeyError::Mismatch { host, fingerprint } => write!(
                f,
                "the key {host} offered ({fingerprint}) is not the one in known_hosts: refused (a changed host key can be an attack)"
            ),
            HostKeyError::Revoked { fingerprint } => {
                write!(f, "the key {fingerprint} is marked @revoked in known_hosts")
            }
            HostKeyError::Unreadable(why) => write!(f, "{why}"),
        }
    }
}

/// The name a host is looked up under: `host`, or `[host]:port` when the port is not 22.
pub fn host_port(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// `*` matches any run, `?` one character (OpenSSH's `match_pattern`, case-insensitively for
/// host names).
fn glob(pattern: &[u8], s: &[u8]) -> bool {
    match (pattern.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&pattern[1..], s) || (!s.is_empty() && glob(pattern, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &s[1..]),
        (Some(a), Some(b)) if a.eq_ignore_ascii_case(b) => glob(&pattern[1..], &s[1..]),
        _ => false,
    }
}

/// Whether a line's host patterns name `name`.
fn names(patterns: &HostPatterns, name: &str) -> bool {
    match patterns {
        HostPatterns::Patterns(list) => {
            let mut matched = false;
            for p in list {
                match p.strip_prefix('!') {
                    // A negated pattern that matches rules the whole line out.
                    Some(neg) if glob(neg.as_bytes(), name.as_bytes()) => return false,
                    Some(_) => {}
                    None => matched |= glob(p.as_bytes(), name.as_bytes()),
                }
            }
            matched
        }
        HostPatterns::HashedName { salt, hash } => {
            use ring::hmac;
            let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
            hmac::verify(&key, name.as_bytes(), hash).is_ok()
        }
    }
}

/// Checks `key`, offered by `host` on `port`, against the `known_hosts` text.
pub fn check_text(text: &str, host: &str, port: u16, key: &PublicKey) -> Result<(), HostKeyError> {
    let name = host_port(host, port);
    let fingerprint = key.fingerprint(russh::keys::HashAlg::Sha256).to_string();
    let (mut known, mut accepted) = (false, false);
    // Parse errors are skipped line by line, like OpenSSH.
    for entry in KnownHosts::new(text).flatten() {
        let same_key = entry.public_key().key_data() == key.key_data();
        match entry.marker() {
            Some(Marker::Revoked) if same_key => {
                return Err(HostKeyError::Revoked { fingerprint });
            }
            Some(_) => {}
            None if names(entry.host_patterns(), &name) => {
                known = true;
                accepted |= same_key;
            }
            None => {}
        }
    }
    match (accepted, known) {
        (true, _) => Ok(()),
        (false, true) => Err(HostKeyError::Mismatch {
            host: name,
            fingerprint,
        }),
        (false, false) => Err(HostKeyError::Unknown {
            host: name,
            fingerprint,
        }),
    }
}

/// Checks `key` against the `known_hosts` file at `path` (read afresh, so edits apply).
pub fn check(
    path: &std::path::Path,
    host: &str,
    port: u16,
    key: &PublicKey,
) -> Result<(), HostKeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        HostKeyError::Unreadable(format!("cannot read known_hosts {}: {e}", path.display()))
    })?;
    check_text(&text, host, port, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::private::Ed25519Keypair;
    use russh::keys::PrivateKey;

    fn key(seed: u8) -> PublicKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
            .public_key()
            .clone()
    }

    fn line(hosts: &str, k: &PublicKey) -> String {
        format!("{hosts} {}\n", k.to_openssh().unwrap())
    }

    /// `ssh-keygen -H` style: HMAC-SHA1 of the name keyed with the salt.
    fn hashed(name: &str, salt: &[u8]) -> String {
        use base64::Engine;
        use ring::hmac;
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt),
            name.as_bytes(),
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        format!("|1|{}|{}", b64.encode(salt), b64.encode(tag.as_ref()))
    }

    #[test]
    fn plain_ported_wildcard_and_hashed_names() {
        let (a, b) = (key(1), key(2));
        let text = [
            "# comment\n".to_string(),
            "garbage line\n".to_string(),
            line("git.test,10.0.0.1", &a),
            line("[git.test]:2222", &b),
            line("*.example.test,!bad.example.test", &a),
            line(&hashed("hidden.test", b"saltsaltsaltsaltsalt"), &b),
        ]
        .concat();
        assert_eq!(check_text(&text, "git.test", 22, &a), Ok(()));
        assert_eq!(check_text(&text, "GIT.test", 22, &a), Ok(()));
        assert_eq!(check_text(&text, "10.0.0.1", 22, &a), Ok(()));
        assert_eq!(check_text(&text, "git.test", 2222, &b), Ok(()));
        assert!(matches!(
            check_text(&text, "git.test", 2222, &a),
            Err(HostKeyError::Mismatch { .. })
        ));
        assert!(matches!(
            check_text(&text, "git.test", 22, &b),
            Err(HostKeyError::Mismatch { .. })
        ));
        assert_eq!(check_text(&text, "x.example.test", 22, &a), Ok(()));
        assert!(matches!(
            check_text(&text, "bad.example.test", 22, &a),
            Err(HostKeyError::Unknown { .. })
        ));
        assert_eq!(check_text(&text, "hidden.test", 22, &b), Ok(()));
        let e = check_text(&text, "other.test", 22, &a).unwrap_err();
        assert!(matches!(e, HostKeyError::Unknown { .. }));
        assert!(e.to_string().contains("SHA256:"), "{e}");
    }

    #[test]
    fn revoked_keys_lose_even_when_another_line_accepts() {
        let a = key(1);
        let text = [
            line("git.test", &a),
            format!("@revoked * {}\n", a.to_openssh().unwrap()),
        ]
        .concat();
        assert!(matches!(
            check_text(&text, "git.test", 22, &a),
            Err(HostKeyError::Revoked { .. })
        ));
        // A CA line accepts nothing by itself.
        let ca = format!("@cert-authority * {}\n", a.to_openssh().unwrap());
        assert!(matches!(
            check_text(&ca, "git.test", 22, &a),
            Err(HostKeyError::Unknown { .. })
        ));
    }

    #[test]
    fn names_hashed_by_openssh_itself_match() {
        // `ssh-keygen -H` hashes a known_hosts file in place (openssh-client; CI installs it).
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("known_hosts");
        let a = key(3);
        std::fs::write(
            &file,
            [line("git.test", &a), line("[git.test]:2222", &a)].concat(),
        )
        .unwrap();
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-H", "-f"])
            .arg(&file)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("ssh-keygen (apt-get install openssh-client)");
        assert!(st.success());
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("|1|") && !text.contains("git.test"),
            "{text}"
        );
        assert_eq!(check(&file, "git.test", 22, &a), Ok(()));
        assert_eq!(check(&file, "git.test", 2222, &a), Ok(()));
        assert!(check(&file, "git.test", 2223, &a).is_err());
    }

    #[test]
    fn a_missing_file_is_an_error_not_an_empty_list() {
        let e = check(
            std::path::Path::new("/no/such/known_hosts"),
            "h",
            22,
            &key(1),
        )
        .unwrap_err();
        assert!(matches!(e, HostKeyError::Unreadable(_)), "{e}");
    }
}
