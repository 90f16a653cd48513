//! The proxy's TLS: the guest-facing server side (a leaf from the sandbox CA; OpenSSL for the
//! clients rustls cannot serve) and the upstream trust.

use matchlock_policy::ca::Leaf;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// Upstream trust: the system roots plus an optional PEM bundle (`MATCHLOCK_UPSTREAM_CA`).
pub fn upstream_tls(extra_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(pem) = extra_pem {
        use rustls::pki_types::pem::PemObject;
        let mut n = 0;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| format!("MATCHLOCK_UPSTREAM_CA: {e}"))?;
            roots
                .add(c)
                .map_err(|e| format!("MATCHLOCK_UPSTREAM_CA: {e}"))?;
            n += 1;
        }
        if n == 0 {
            return Err("MATCHLOCK_UPSTREAM_CA holds no PEM certificate".into());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serves the TLS handshake of a guest client that sends no `signature_algorithms` (TLS 1.2
/// clients that predate it or leave it out, such as busybox's built-in `wget` TLS): rustls
/// refuses those (RFC 5246 would have the server fall back to SHA-1 signatures), so they are
/// answered by OpenSSL, TLS 1.2 only, with the same leaf from the sandbox CA. Weaker suites
/// are acceptable here: this link runs between the guest and matchlock inside one host.
pub async fn legacy_tls<S>(leaf: &Leaf, io: S) -> Result<tokio_openssl::SslStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslVersion};
    let e = |e: openssl::error::ErrorStack| e.to_string();
    let mut b = SslAcceptor::mozilla_intermediate(SslMethod::tls_server()).map_err(e)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(e)?;
    b.set_max_proto_version(Some(SslVersion::TLS1_2))
        .map_err(e)?;
    // SHA-1 signatures (what a client without signature_algorithms accepts) need level 0.
    b.set_cipher_list(
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:\
         ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:\
         ECDHE-ECDSA-AES256-SHA:@SECLEVEL=0",
    )
    .map_err(e)?;
    let cert = openssl::x509::X509::from_der(&leaf.cert_der).map_err(e)?;
    let ca = openssl::x509::X509::from_der(&leaf.ca_der).map_err(e)?;
    let key = openssl::pkey::PKey::private_key_from_der(&leaf.key_der).map_err(e)?;
    b.set_certificate(&cert).map_err(e)?;
    b.set_private_key(&key).map_err(e)?;
    b.add_extra_chain_cert(ca).map_err(e)?;
    let acceptor = b.build();
    let ssl = Ssl::new(acceptor.context()).map_err(e)?;
    let mut stream = tokio_openssl::SslStream::new(ssl, io).map_err(e)?;
    Pin::new(&mut stream)
        .accept()
        .await
        .map_err(|err| err.to_string())?;
    Ok(stream)
}

/// The rustls server side for a guest connection to `leaf`'s name, offering h2 and HTTP/1.1.
pub fn server_tls(leaf: &Leaf) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![
        CertificateDer::from(leaf.cert_der.clone()),
        CertificateDer::from(leaf.ca_der.clone()),
    ];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}
