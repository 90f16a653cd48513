//! The interception proxy in-process, against a real TLS upstream on loopback that speaks both
//! HTTP/2 and HTTP/1.1: a guest-side client (trusting only the sandbox CA) goes through
//! `Proxy::serve` exactly as the network stack hands it a guest connection.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use matchlock_intercept::ca::MitmCa;
use matchlock_intercept::hosts::{AllowList, NameTable};
use matchlock_intercept::proxy::{upstream_tls, Proxy, Target};
use matchlock_intercept::rules::Rules;
use matchlock_intercept::secrets::{Secret, Secrets};
use sha2::Digest;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// TCP connections the upstream accepted.
static ACCEPTED: AtomicUsize = AtomicUsize::new(0);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An upstream for `up.test` (certificate from a fresh CA): answers with the protocol version it
/// saw and the sha256 of the Authorization header it got. Returns its port and the CA PEM.
async fn upstream() -> (u16, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "proxy test upstream CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["up.test".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            ACCEPTED.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    let body = format!(
                        "{:?} auth_sha={} echo={auth}",
                        req.version(),
                        hex::encode(sha2::Sha256::digest(auth.as_bytes()))
                    );
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, ca_cert.pem())
}

async fn proxy(ca_pem: &str, placeholder: &str) -> Arc<Proxy> {
    let names = Arc::new(NameTable::default());
    names.record("up.test", &["127.0.0.1".parse().unwrap()]);
    let secret = Secret::new(
        "K",
        "real-value-1",
        AllowList::new(["up.test"]).unwrap(),
        Some(placeholder),
    );
    Arc::new(Proxy::new(
        AllowList::new(["up.test"]).unwrap(),
        Secrets::new(vec![secret]),
        MitmCa::generate("vm-test").unwrap(),
        names,
        Arc::new(|_| Ok(())),
        upstream_tls(Some(ca_pem.as_bytes())).unwrap(),
        None,
        Rules::default(),
    ))
}

/// One request from the "guest": TLS to the proxy (trusting only the sandbox CA) with `alpn`.
async fn guest_request(p: &Arc<Proxy>, port: u16, alpn: &[u8]) -> (u16, String) {
    let (guest, theirs) = tokio::io::duplex(1 << 16);
    let target = Target {
        visible: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        real: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    tokio::spawn(p.clone().serve(theirs, target));
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(p.ca_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("up.test").unwrap(),
            guest,
        )
        .await
        .expect("the guest trusts the sandbox CA");
    let auth = "Bearer PH_K_0123";
    let uri = format!("https://up.test:{port}/x");
    let resp = if alpn == b"h2" {
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get(uri)
            .header("authorization", auth)
            .body(Empty::<Bytes>::new())
            .unwrap();
        s.send_request(req).await.unwrap()
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/x")
            .header("host", format!("up.test:{port}"))
            .header("authorization", auth)
            .body(Empty::<Bytes>::new())
            .unwrap();
        s.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn h2_and_http1_guests_reach_an_h2_upstream_with_secrets_swapped() {
    let (port, ca) = upstream().await;
    let p = proxy(&ca, "PH_K_0123").await;
    let want_sha = hex::encode(sha2::Sha256::digest(b"Bearer real-value-1"));
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let before = ACCEPTED.load(Ordering::SeqCst);
        let (status, body) = guest_request(&p, port, alpn).await;
        // Keep-alive: both requests of the guest connection shared one upstream connection.
        assert_eq!(ACCEPTED.load(Ordering::SeqCst) - before, 1);
        assert_eq!(status, 200, "{body}");
        // The upstream spoke HTTP/2 (ALPN) whatever the guest spoke, got the real value, and its
        // echo came back as the placeholder.
        assert!(body.starts_with("HTTP/2.0"), "{body}");
        assert!(body.contains(&format!("auth_sha={want_sha}")), "{body}");
        assert!(body.ends_with("echo=Bearer PH_K_0123"), "{body}");
        assert!(!body.contains("real-value-1"), "{body}");
    }
}
