//! End-to-end tests of interception: a real guest (python3's urllib and sockets) talking through
//! matchlock's MITM proxy to upstreams on the host's loopback, one plain HTTP and one HTTPS with its
//! own test CA (passed to matchlock as MATCHLOCK_UPSTREAM_CA). Nothing leaves the machine.

#[path = "common/mod.rs"]
mod common;

use common::*;
use sha2::Digest;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};

const SECRET: &str = "sk-real-42-never-in-guest";

fn sha(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Answers every request with `path=<target> auth=<Authorization> auth_sha=<sha256 of it>`, so a
/// test can see what arrived upstream (the sha) and what the guest gets back (the echo).
fn respond<S: Read + Write>(mut s: S) {
    let mut reader = BufReader::new(&mut s);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut auth = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = v.trim().to_string();
            }
        }
    }
    let body = format!(
        "path={target} auth={auth} auth_sha={} path_sha={}",
        sha(&auth),
        sha(&target)
    );
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\nX-Echo-Auth: {auth}\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
    let _ = s.flush();
}

fn http_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || respond(c));
        }
    });
    port
}

/// An HTTPS upstream whose certificate (for `api.test` and `*.glob.test`) comes from a test CA;
/// returns its port and the CA file.
fn https_upstream(dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "intercept test upstream CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["api.test".to_string(), "*.glob.test".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                    return;
                };
                respond(rustls::StreamOwned::new(conn, c));
            });
        }
    });
    (port, ca_file)
}

/// A DNS upstream that records the names it is asked and answers nothing useful.
fn dns_recorder() -> (u16, Arc<Mutex<Vec<String>>>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let (mut i, mut labels) = (12usize, Vec::new());
            while i < n && buf[i] != 0 {
                let len = buf[i] as usize;
                labels
                    .push(String::from_utf8_lossy(&buf[i + 1..(i + 1 + len).min(n)]).into_owned());
                i += 1 + len;
            }
            seen2.lock().unwrap().push(labels.join("."));
            // NXDOMAIN.
            let mut r = buf[..n].to_vec();
            r[2] = 0x81;
            r[3] = 0x83;
            let _ = s.send_to(&r, from);
        }
    });
    (port, seen)
}

#[test]
fn allow_lists_mitm_and_secrets_end_to_end() {
    let py = python_image();
    let dir = tempfile::tempdir().unwrap();
    let http = http_upstream();
    let (https, ca) = https_upstream(dir.path());
    let (dns, seen) = dns_recorder();
    let script = format!(
        r#"
import base64, json, os, socket, ssl, urllib.request, urllib.error, http.client
key = os.environ["API_KEY"]
def get(url, headers={{}}):
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=20)
        return r.status, r.read().decode(), {{k.lower(): v for k, v in r.headers.items()}}
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip(), {{}}
    except Exception as e:
        return "error", repr(e), {{}}
out = {{}}
out["env"] = key
out["http"] = get("http://api.test:{http}/a", {{"Authorization": "Bearer " + key}})
out["query"] = get("https://api.test:{https}/q?token=" + key)
out["basic"] = get("https://api.test:{https}/b", {{"Authorization": "Basic " + base64.b64encode(("user:" + key).encode()).decode()}})
out["glob"] = get("https://x.glob.test:{https}/g")
out["glob_infix"] = get("http://svc-eu.test:{http}/i")
out["glob_prefix"] = get("http://pre.fix:{http}/p")
out["glob_miss"] = get("http://svc.test:{http}/m")
out["blocked"] = get("http://other.test:{http}/")
out["wrong_host"] = get("https://x.glob.test:{https}/w", {{"Authorization": "Bearer " + key}})
# SNI api.test, Host header for another allowed name.
c = http.client.HTTPSConnection("api.test", {https}, timeout=20, context=ssl.create_default_context())
c.request("GET", "/m", headers={{"Host": "x.glob.test"}})
r = c.getresponse(); out["mismatch"] = [r.status, r.read().decode().strip()]
s = socket.create_connection(("api.test", {http}), timeout=10)
s.sendall(b"SSH-2.0-OpenSSH_9.0\r\n")
try:
    out["raw"] = s.recv(100).decode()
except Exception as e:
    out["raw"] = "reset"
out["sinkhole"] = socket.gethostbyname("nope.example")
import subprocess
def curl(*args):
    p = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True)
    return [p.returncode, p.stdout, p.stderr]
# curl's own TLS stack trusts the sandbox CA too (CURL_CA_BUNDLE), over HTTP/2 and HTTP/1.1.
out["curl_h2"] = curl("--http2", "-w", " http=%{{http_version}}", "https://x.glob.test:{https}/c")
out["curl_h1"] = curl("--http1.1", "-w", " http=%{{http_version}}", "https://api.test:{https}/d")
# busybox's wget: its own TLS 1.2, which sends no signature_algorithms (rustls refuses that).
p = subprocess.run(["wget", "-q", "-O-", "https://api.test:{https}/wget"], capture_output=True, text=True)
out["wget"] = [p.returncode, p.stdout, p.stderr]
print(json.dumps(out))
"#
    );
    let dns_arg = format!("127.0.0.1:{dns}");
    let secret = format!("API_KEY={SECRET}@api.test");
    let events = dir.path().join("events.jsonl");
    let out = ml(&[
        "run",
        "--image",
        py,
        "--add-host",
        "api.test:127.0.0.1",
        "--add-host",
        "x.glob.test:127.0.0.1",
        "--add-host",
        "other.test:127.0.0.1",
        "--add-host",
        "svc-eu.test:127.0.0.1",
        "--add-host",
        "svc.test:127.0.0.1",
        "--add-host",
        "pre.fix:127.0.0.1",
        "--allow-private-host",
        "127.0.0.1",
        "--allow-host",
        "api.test,*.glob.test,svc-*.test,pre.*",
        "--secret",
        &secret,
        // The plain-HTTP case below injects in clear text, which needs the secret's consent.
        "--secret-over-http",
        "API_KEY",
        "--dns-servers",
        &dns_arg,
        "--event-log",
        events.to_str().unwrap(),
        "--run-id",
        "run-7",
        "--agent-system",
        "e2e",
        "--",
        "python3",
        "-c",
        &script,
    ])
    .env("MATCHLOCK_UPSTREAM_CA", &ca)
    .output()
    .unwrap();
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "stdout: {text}\nstderr: {}",
        stderr(&out)
    );
    assert!(
        !text.contains(SECRET),
        "the real secret reached the guest: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let placeholder = v["env"].as_str().unwrap();
    assert!(placeholder.starts_with("SANDBOX_SECRET_"), "{v}");

    // Header substitution over plain HTTP: upstream got the real value, the guest sees its echo as
    // the placeholder, in the body and in the echoed header.
    let body = v["http"][1].as_str().unwrap();
    assert_eq!(v["http"][0], 200, "{v}");
    assert!(
        body.contains(&format!("auth_sha={}", sha(&format!("Bearer {SECRET}")))),
        "{body}"
    );
    assert!(
        body.contains(&format!("auth=Bearer {placeholder}")),
        "{body}"
    );
    assert_eq!(v["http"][2]["x-echo-auth"], format!("Bearer {placeholder}"));
    // Query over HTTPS (the guest trusted the sandbox CA; matchlock verified the upstream).
    assert_eq!(v["query"][0], 200, "{v}");
    assert!(
        v["query"][1]
            .as_str()
            .unwrap()
            .contains(&format!("path_sha={}", sha(&format!("/q?token={SECRET}")))),
        "{v}"
    );
    // Basic credentials.
    let basic = format!("Basic {}", base64_encode(&format!("user:{SECRET}")));
    assert!(
        v["basic"][1]
            .as_str()
            .unwrap()
            .contains(&format!("auth_sha={}", sha(&basic))),
        "{v}"
    );
    // Glob, and refusals with reasons.
    assert_eq!(v["glob"][0], 200, "{v}");
    assert_eq!(v["glob_infix"][0], 200, "{v}");
    assert_eq!(v["glob_prefix"][0], 200, "{v}");
    assert_eq!(v["glob_miss"][0], 403, "{v}");
    assert_eq!(v["blocked"][0], 403, "{v}");
    assert!(
        v["blocked"][1]
            .as_str()
            .unwrap()
            .contains("not on this sandbox's allow-list"),
        "{v}"
    );
    assert_eq!(v["wrong_host"][0], 403, "{v}");
    assert!(
        v["wrong_host"][1]
            .as_str()
            .unwrap()
            .contains("secret API_KEY may not be sent to x.glob.test"),
        "{v}"
    );
    assert_eq!(v["mismatch"][0], 403, "{v}");
    assert!(
        v["mismatch"][1]
            .as_str()
            .unwrap()
            .contains("does not match the TLS server name"),
        "{v}"
    );
    // Non-HTTP TCP is refused; names off the allow-list never reach the upstream resolver.
    assert!(v["raw"] == "" || v["raw"] == "reset", "{v}");
    assert_eq!(v["sinkhole"], "198.19.255.254");
    assert!(
        !seen.lock().unwrap().iter().any(|n| n.contains("nope")),
        "{:?}",
        seen.lock().unwrap()
    );

    assert_eq!(v["wget"][0], 0, "busybox wget over HTTPS: {v}");
    assert!(
        v["wget"][1].as_str().unwrap().starts_with("path=/wget"),
        "{v}"
    );
    for (k, version) in [("curl_h2", "http=2"), ("curl_h1", "http=1.1")] {
        assert_eq!(v[k][0], 0, "{k}: {v}");
        let body = v[k][1].as_str().unwrap();
        assert!(
            body.starts_with("path=/") && body.ends_with(version),
            "{k}: {body}"
        );
    }

    // The event log: decisions, requests, injections and responses, never the value.
    let log = std::fs::read_to_string(&events).unwrap();
    assert!(!log.contains(SECRET));
    let evs: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| evs.iter().any(f);
    assert!(
        evs.iter()
            .all(|e| e["run_id"] == "run-7" && e["agent_system"] == "e2e"),
        "{log}"
    );
    assert!(
        has(&|e| e["event_type"] == "gate_decision"
            && e["data"]["host"] == "api.test"
            && e["data"]["allowed"] == true),
        "{log}"
    );
    assert!(
        has(&|e| e["event_type"] == "gate_decision"
            && e["data"]["host"] == "other.test"
            && e["data"]["allowed"] == false),
        "{log}"
    );
    assert!(
        has(&|e| e["event_type"] == "request_transform"
            && e["data"]["action"] == "injected"
            && e["data"]["secret"] == "API_KEY"),
        "{log}"
    );
    assert!(
        has(&|e| e["event_type"] == "http_request" && e["data"]["method"] == "GET"),
        "{log}"
    );
    assert!(
        has(&|e| e["event_type"] == "http_response" && e["data"]["status"] == 200),
        "{log}"
    );
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn allow_list_changes_at_runtime() {
    let py = python_image();
    let http = http_upstream();
    let start = |mode: &str| {
        let out = ok(run(&[
            "run",
            "-d",
            "--image",
            py,
            "--add-host",
            "api.test:127.0.0.1",
            "--add-host",
            "other.test:127.0.0.1",
            "--allow-private-host",
            "127.0.0.1",
            mode,
            "--",
            "sleep",
            "600",
        ]));
        Sandbox {
            id: out.trim().to_string(),
        }
    };
    let fetch = format!(
        "import urllib.request, urllib.error\ntry:\n print(urllib.request.urlopen('http://api.test:{http}/x', timeout=20).status)\nexcept urllib.error.HTTPError as e:\n print(e.code)"
    );
    // --network-intercept alone: interception with an empty list, which allows every host
    // (Matchlock's rule); naming a host closes it to the others, deleting the last opens it.
    let sb = start("--network-intercept");
    assert_eq!(stdout(&sb.exec(&["python3", "-c", &fetch])), "200\n");
    let out = ok(run(&["allow-list", "add", &sb.id, "other.test"]));
    assert!(
        out.contains(&format!("Added to {}: other.test", sb.id)),
        "{out}"
    );
    assert!(out.contains("Current allow-list: other.test"), "{out}");
    assert_eq!(stdout(&sb.exec(&["python3", "-c", &fetch])), "403\n");
    let out = ok(run(&[
        "allow-list",
        "delete",
        &sb.id,
        "other.test,nope.test",
    ]));
    assert!(
        out.contains(&format!("Removed from {}: other.test", sb.id)),
        "{out}"
    );
    assert!(
        out.contains("Current allow-list: (empty: all hosts allowed)"),
        "{out}"
    );
    assert_eq!(stdout(&sb.exec(&["python3", "-c", &fetch])), "200\n");
    drop(sb);
    // --secret alone: interception with an empty list, which allows every host too (a secret's
    // host is where its value may go, not a list of what is reachable).
    let sb = start("--secret=K=v@api.test");
    let other = fetch.replace("api.test", "other.test");
    assert_eq!(stdout(&sb.exec(&["python3", "-c", &other])), "200\n");
    drop(sb);
    // --deny-by-default: nothing until a host is added, closed again when it is deleted.
    let sb = start("--deny-by-default");
    assert_eq!(stdout(&sb.exec(&["python3", "-c", &fetch])), "403\n");
    let out = ok(run(&["allow-list", "add", &sb.id, "api.test"]));
    assert!(
        out.contains(&format!("Added to {}: api.test", sb.id)),
        "{out}"
    );
    assert_eq!(stdout(&sb.exec(&["python3", "-c", &fetch])), "200\n");
    let out = ok(run(&["allow-list", "add", &sb.id, "api.test"]));
    assert!(
        out.contains(&format!("No new hosts were added to {}", sb.id)),
        "{out}"
    );
    let out = ok(run(&["allow-list", "delete", &sb.id, "api.test"]));
    assert!(
        out.contains("Current allow-list: (empty: no hosts allowed)"),
        "{out}"
    );
    assert_eq!(stdout(&sb.exec(&["python3", "-c", &fetch])), "403\n");
    // A sandbox without interception says so.
    let open = Sandbox::detached(&[], &["sleep", "600"]);
    let o = run(&["allow-list", "add", &open.id, "x.test"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("without network interception"),
        "{}",
        stderr(&o)
    );
}
