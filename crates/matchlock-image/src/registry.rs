//! The registry connection: transport security rules, the oci-client set-up, and turning
//! oci-client's errors into one-line, actionable [`ImageError`]s.
//!
//! Transport rules (Docker's): HTTPS, verified against the system roots plus an optional extra
//! CA. Plain HTTP is allowed only for registries on loopback addresses (`localhost`, 127.0.0.0/8,
//! `::1`) and for those the user names in `MATCHLOCK_INSECURE_REGISTRIES`; even for those, HTTPS
//! is tried first and HTTP only when the registry does not speak TLS at all. A certificate that
//! fails verification is never a reason to fall back.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use crate::auth::{self, Credentials};
use crate::util::one_line;
use crate::ImageError;

/// How long to wait for a TCP/TLS connection: long enough for a slow network, short enough that
/// a registry that silently drops packets is reported while the user still waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a read may stall before the pull fails (not a bound on the whole blob): a registry
/// that stops answering is reported well within a minute, and a resumed pull continues where
/// this one stopped.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach registries: credentials, trust and the plain-HTTP allow-list.
///
/// [`RegistryConfig::from_env`] reads the environment; tests and embedders fill the fields
/// directly. `Debug` never shows the password.
#[derive(Clone, Default)]
pub struct RegistryConfig {
    /// User name for every registry (`MATCHLOCK_REGISTRY_USERNAME`). Takes precedence over the
    /// Docker config file.
    pub username: Option<String>,
    /// Password or token for `username` (`MATCHLOCK_REGISTRY_PASSWORD`).
    pub password: Option<String>,
    /// Docker client config whose `auths.<registry>.auth` supplies credentials
    /// (`$DOCKER_CONFIG/config.json`, default `~/.docker/config.json`); `None` disables it.
    pub docker_config: Option<PathBuf>,
    /// A PEM file of extra CA certificates to trust besides the system roots
    /// (`MATCHLOCK_REGISTRY_CA`).
    pub extra_ca: Option<PathBuf>,
    /// Registries (`host` or `host:port`) that may be reached over plain HTTP
    /// (`MATCHLOCK_INSECURE_REGISTRIES`, comma-separated). Loopback registries always may.
    pub insecure: Vec<String>,
}

impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("docker_config", &self.docker_config)
            .field("extra_ca", &self.extra_ca)
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl RegistryConfig {
    /// Settings from the environment: `MATCHLOCK_REGISTRY_USERNAME`, `MATCHLOCK_REGISTRY_PASSWORD`,
    /// `MATCHLOCK_REGISTRY_CA`, `MATCHLOCK_INSECURE_REGISTRIES`, and the Docker config file.
    pub fn from_env() -> RegistryConfig {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        RegistryConfig {
            username: var("MATCHLOCK_REGISTRY_USERNAME"),
            password: var("MATCHLOCK_REGISTRY_PASSWORD"),
            docker_config: auth::default_docker_config(),
            extra_ca: var("MATCHLOCK_REGISTRY_CA").map(PathBuf::from),
            insecure: var("MATCHLOCK_INSECURE_REGISTRIES")
                .map(|v| parse_list(&v))
                .unwrap_or_default(),
        }
    }

    fn credentials(&self, registry: &str) -> Result<Credentials, ImageError> {
        if let Some(user) = &self.username {
            return Ok(Credentials {
                auth: RegistryAuth::Basic(user.clone(), self.password.clone().unwrap_or_default()),
                source: "MATCHLOCK_REGISTRY_USERNAME/MATCHLOCK_REGISTRY_PASSWORD".into(),
            });
        }
        if let Some(path) = &self.docker_config {
            if let Some(c) = auth::from_docker_config(path, registry)? {
                return Ok(c);
            }
        }
        Ok(Credentials::anonymous())
    }

    /// Whether `registry` (`host[:port]`) may be reached over plain HTTP.
    pub(crate) fn allows_plain_http(&self, registry: &str) -> bool {
        let host = host_of(registry);
        is_loopback(host) || self.insecure.iter().any(|i| i == registry || i == host)
    }

    fn extra_roots(&self) -> Result<Vec<Certificate>, ImageError> {
        let Some(path) = &self.extra_ca else {
            return Ok(Vec::new());
        };
        let data = std::fs::read(path).map_err(|e| {
            ImageError::RegistryConfig(format!(
                "cannot read the CA file {} (MATCHLOCK_REGISTRY_CA): {e}",
                path.display()
            ))
        })?;
        if !data
            .windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            return Err(ImageError::RegistryConfig(format!(
                "{} (MATCHLOCK_REGISTRY_CA) holds no PEM certificate; give a PEM file with the CA certificate",
                path.display()
            )));
        }
        Ok(vec![Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        }])
    }
}

/// `a, b,,c` => `["a", "b", "c"]`.
fn parse_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The host part of `host[:port]`, without IPv6 brackets.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => registry,
    }
}

/// Loopback as Docker defines it for its implicit insecure registries.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A connected, authorised client for one repository.
pub(crate) struct Connection {
    pub client: Client,
    pub auth: RegistryAuth,
    pub ctx: ErrorContext,
}

/// What error messages need to know about the registry being talked to.
#[derive(Clone)]
pub(crate) struct ErrorContext {
    pub registry: String,
    pub repository: String,
    pub reference: String,
    creds_source: String,
    anonymous: bool,
}

fn client(cfg: &RegistryConfig, protocol: ClientProtocol) -> Result<Client, ImageError> {
    let config = ClientConfig {
        protocol,
        extra_root_certificates: cfg.extra_roots()?,
        // We pick the platform ourselves (pull.rs) from the raw index.
        platform_resolver: None,
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: concat!("matchlock/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    };
    // try_from, not new: new() silently falls back to a default client (dropping the extra CA)
    // when the configuration is rejected.
    Client::try_from(config).map_err(|e| {
        ImageError::RegistryConfig(format!(
            "cannot set up the registry client: {}; check MATCHLOCK_REGISTRY_CA",
            one_line(chain(&e).as_bytes())
        ))
    })
}

/// Connect to the registry of `reference` and authorise for pulling (anonymous bearer tokens,
/// basic auth, or token exchange with credentials).
pub(crate) async fn connect(
    reference: &Reference,
    cfg: &RegistryConfig,
) -> Result<Connection, ImageError> {
    // The registry as the user wrote it; oci-client maps docker.io to index.docker.io itself.
    let registry = reference.resolve_registry().to_string();
    let creds = cfg.credentials(&registry)?;
    let ctx = ErrorContext {
        registry: reference.registry().to_string(),
        repository: reference.repository().to_string(),
        reference: reference.whole(),
        creds_source: creds.source.clone(),
        anonymous: creds.is_anonymous(),
    };
    let https = client(cfg, ClientProtocol::Https)?;
    match https
        .auth(reference, &creds.auth, RegistryOperation::Pull)
        .await
    {
        Ok(_) => Ok(Connection {
            client: https,
            auth: creds.auth,
            ctx,
        }),
        Err(e) => {
            let mapped = map_error(e, &ctx);
            let tls_refused = matches!(mapped, ImageError::NotHttps { .. });
            let unreachable = matches!(mapped, ImageError::RegistryUnreachable { .. });
            if !(cfg.allows_plain_http(&registry) && (tls_refused || unreachable)) {
                return Err(mapped);
            }
            tracing::debug!(registry, "registry does not speak HTTPS; using plain HTTP");
            let http = client(cfg, ClientProtocol::Http)?;
            http.auth(reference, &creds.auth, RegistryOperation::Pull)
                .await
                .map_err(|e| map_error(e, &ctx))?;
            Ok(Connection {
                client: http,
                auth: creds.auth,
                ctx,
            })
        }
    }
}

/// The error and all its sources, joined with ": " (reqwest hides the useful part in sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// The innermost cause, which is what a user can act on ("Connection refused (os error 111)").
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    cur.to_string()
}

/// Turn an oci-client error into a one-line [`ImageError`] that says what to do.
pub(crate) fn map_error(e: OciDistributionError, ctx: &ErrorContext) -> ImageError {
    let registry = ctx.registry.clone();
    let unauthorized = || ImageError::Unauthorized {
        registry: ctx.registry.clone(),
        repository: ctx.repository.clone(),
        hint: if ctx.anonymous {
            format!(
                "it requires credentials (or the repository does not exist); set MATCHLOCK_REGISTRY_USERNAME and MATCHLOCK_REGISTRY_PASSWORD, or add auths.\"{}\" to ~/.docker/config.json",
                ctx.registry
            )
        } else {
            format!(
                "the credentials from {} were rejected or lack pull access; check them",
                ctx.creds_source
            )
        },
    };
    let not_found = || ImageError::NotInRegistry {
        reference: ctx.reference.clone(),
        registry: ctx.registry.clone(),
    };
    match e {
        OciDistributionError::RequestError(re) => {
            let full = chain(&re);
            let lower = full.to_ascii_lowercase();
            if lower.contains("certificate") || lower.contains("unknownissuer") {
                ImageError::Tls {
                    registry,
                    reason: one_line(root_cause(&re).as_bytes()),
                }
            } else if lower.contains("corrupt message") || lower.contains("invalidcontenttype") {
                ImageError::NotHttps { registry }
            } else if re.is_body() || re.is_decode() {
                // The connection died mid-response.
                ImageError::Interrupted {
                    registry,
                    what: format!("a response for {}", ctx.reference),
                    reason: one_line(root_cause(&re).as_bytes()),
                    resume: String::new(),
                }
            } else if re.is_connect() || re.is_timeout() {
                ImageError::RegistryUnreachable {
                    registry,
                    reason: one_line(root_cause(&re).as_bytes()),
                }
            } else {
                ImageError::Registry {
                    registry,
                    message: one_line(full.as_bytes()),
                }
            }
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => unauthorized(),
        OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                not_found()
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                unauthorized()
            } else if codes.contains(&&OciErrorCode::Toomanyrequests) {
                ImageError::Registry {
                    registry,
                    message: "too many requests (rate limited); wait and retry, or log in".into(),
                }
            } else {
                let msgs: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|e| format!("{:?}: {}", e.code, e.message))
                    .collect();
                ImageError::Registry {
                    registry,
                    message: one_line(msgs.join("; ").as_bytes()),
                }
            }
        }
        OciDistributionError::ServerError { code, message, .. } => match code {
            404 => not_found(),
            401 | 403 => unauthorized(),
            _ => ImageError::Registry {
                registry,
                message: format!(
                    "HTTP {code}: {}; retry later or check the registry's logs",
                    one_line(message.as_bytes())
                ),
            },
        },
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected,
            actual,
        }) => ImageError::DigestMismatch {
            what: format!("blob {expected} from {}", ctx.registry),
            expected,
            actual,
            remedy: "the registry served corrupt data; retry the pull".into(),
        },
        other => ImageError::Registry {
            registry,
            message: one_line(chain(&other).as_bytes()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_and_listed() {
        let cfg = RegistryConfig {
            insecure: parse_list(" reg.internal:5000, ,other.internal,"),
            ..Default::default()
        };
        assert_eq!(cfg.insecure, ["reg.internal:5000", "other.internal"]);
        for ok in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "reg.internal:5000",
            "other.internal:443",
        ] {
            assert!(cfg.allows_plain_http(ok), "{ok}");
        }
        for no in [
            "docker.io",
            "index.docker.io",
            "10.0.0.1:5000",
            "reg.internal:5001",
            "localhost.example.com",
            "128.0.0.1",
        ] {
            assert!(!cfg.allows_plain_http(no), "{no}");
        }
    }

    #[test]
    fn debug_redacts_the_password() {
        let cfg = RegistryConfig {
            username: Some("alice".into()),
            password: Some("hunter2".into()),
            ..Default::default()
        };
        let shown = format!("{cfg:?}");
        assert!(
            shown.contains("alice") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
