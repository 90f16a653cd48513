//! Registry credentials: `MATCHLOCK_REGISTRY_USERNAME`/`MATCHLOCK_REGISTRY_PASSWORD`, else the
//! `auths` section of the Docker client config, else anonymous (which still gets Docker Hub-style
//! bearer tokens: oci-client follows the registry's `WWW-Authenticate` challenge).
//!
//! Credentials only ever leave this module inside an [`oci_client::secrets::RegistryAuth`]; error
//! messages name where credentials came from ([`Credentials::source`]), never their values.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;

use crate::util::read_capped;
use crate::ImageError;

/// Cap on the Docker config file: real ones are a few KiB.
const DOCKER_CONFIG_CAP: u64 = 4 << 20;

/// Credentials for one registry, with where they came from.
pub(crate) struct Credentials {
    pub auth: RegistryAuth,
    /// Human description of the source, for error hints ("anonymous", "MATCHLOCK_REGISTRY_USERNAME", ...).
    pub source: String,
}

/// Shows the source only: the credentials themselves must never reach a log.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub(crate) fn anonymous() -> Credentials {
        Credentials {
            auth: RegistryAuth::Anonymous,
            source: "anonymous".into(),
        }
    }

    pub(crate) fn is_anonymous(&self) -> bool {
        matches!(self.auth, RegistryAuth::Anonymous)
    }
}

/// The `auths` keys a registry may be stored under: Docker writes Docker Hub as
/// `https://index.docker.io/v1/`, other registries as bare `host[:port]`, and some tools add a
/// scheme.
fn config_keys(registry: &str) -> Vec<String> {
    let mut keys = vec![
        registry.to_string(),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    if matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    ) {
        keys.extend(
            [
                "https://index.docker.io/v1/",
                "index.docker.io",
                "docker.io",
                "registry-1.docker.io",
            ]
            .map(String::from),
        );
    }
    keys
}

/// Look `registry` up in a Docker config file (`{"auths": {"<registry>": {"auth": "<base64 user:pass>"}}}`).
/// A missing file means no credentials; an unreadable or malformed one is an error, because
/// silently pulling anonymously would turn into a confusing "unauthorized" later.
pub(crate) fn from_docker_config(
    path: &Path,
    registry: &str,
) -> Result<Option<Credentials>, ImageError> {
    if !path.exists() {
        return Ok(None);
    }
    let shown = path.display().to_string();
    let bytes = read_capped(path, DOCKER_CONFIG_CAP, &shown)?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        ImageError::RegistryConfig(format!("{shown} is not valid JSON ({e}); fix or remove it"))
    })?;
    let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    for key in config_keys(registry) {
        let Some(entry) = auths.get(&key) else {
            continue;
        };
        let Some(encoded) = entry.get("auth").and_then(|a| a.as_str()) else {
            continue;
        };
        if encoded.is_empty() {
            continue;
        }
        // The decoded value is a secret: errors below must not include it.
        let bad = || {
            ImageError::RegistryConfig(format!(
                "{shown}: auths.\"{key}\".auth is not base64 of user:password; log in again"
            ))
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, pass) = decoded.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials {
            auth: RegistryAuth::Basic(user.to_string(), pass.to_string()),
            source: format!("{shown} (auths.\"{key}\")"),
        }));
    }
    Ok(None)
}

/// The Docker client config file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub(crate) fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        assert!(from_docker_config(&path, "r.example").unwrap().is_none());
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &path,
            serde_json::json!({"auths": {
                "127.0.0.1:5000": {"auth": enc("alice:s3cret:with:colons")},
                "https://index.docker.io/v1/": {"auth": enc("bob:hub")},
                "bad.example": {"auth": "!!!"},
            }})
            .to_string(),
        )
        .unwrap();
        let c = from_docker_config(&path, "127.0.0.1:5000")
            .unwrap()
            .unwrap();
        assert!(
            matches!(&c.auth, RegistryAuth::Basic(u, p) if u == "alice" && p == "s3cret:with:colons")
        );
        assert!(!c.source.contains("s3cret"));
        let c = from_docker_config(&path, "index.docker.io")
            .unwrap()
            .unwrap();
        assert!(matches!(&c.auth, RegistryAuth::Basic(u, _) if u == "bob"));
        assert!(from_docker_config(&path, "other.example")
            .unwrap()
            .is_none());
        let err = from_docker_config(&path, "bad.example")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not base64"), "{err}");
        std::fs::write(&path, "{not json").unwrap();
        assert!(from_docker_config(&path, "x").is_err());
    }
}
