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
    let Some((line, headers, _)) = read_request(&mut s) else {
        return;
    };
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let auth = headers
        .iter()
        .rev()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
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
    https_upstream_with(dir, respond)
}

/// Like [`https_upstream`], each connection served by `serve`.
fn https_upstream_with(
    dir: &std::path::Path,
    serve: fn(rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>),
) -> (u16, std::path::PathBuf) {
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
                serve(rustls::StreamOwned::new(conn, c));
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

/// A request as a fake upstream saw it: (request line, headers lower-cased, body).
type Seen = (String, Vec<(String, String)>, String);

/// One HTTP/1.1 request read whole.
fn read_request<S: Read>(s: &mut S) -> Option<Seen> {
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).ok().filter(|n| *n > 0)?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    Some((
        line.trim().to_string(),
        headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// What the fake model APIs received, one line per request.
static MODEL_CALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A fake of the cloud's model APIs: OpenRouter-style chat completions (JSON, with the cost it
/// reports) and Anthropic's messages (JSON, or an event stream when asked to stream).
fn cloud_model_api<S: Read + Write>(mut s: S) {
    let Some((line, headers, body)) = read_request(&mut s) else {
        return;
    };
    MODEL_CALLS
        .lock()
        .unwrap()
        .push(format!("cloud {line} {headers:?} {body}"));
    let (ctype, answer) = if line.contains("/chat/completions") {
        (
            "application/json",
            r#"{"model":"openai/gpt-4o-mini","choices":[{"message":{"content":"hello from openrouter"}}],"usage":{"prompt_tokens":40,"completion_tokens":60,"cost":0.001}}"#,
        )
    } else if body.contains(r#""stream": true"#) {
        (
            "text/event-stream",
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-3-5-haiku-20241022\",\"usage\":{\"input_tokens\":1000,\"output_tokens\":1}}}\n\n\
             event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hello from the cloud\"}}\n\n\
             event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":2000}}\n\n\
             event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        )
    } else {
        (
            "application/json",
            r#"{"type":"message","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"hello from the cloud"}],"usage":{"input_tokens":1000,"output_tokens":2000}}"#,
        )
    };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
    let _ = s.write_all(resp.as_bytes());
}

/// A fake of Ollama's OpenAI-compatible API: a streamed chat completion whose last event
/// carries the usage.
fn local_backend() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Some((line, headers, body)) = read_request(&mut c) else {
                    return;
                };
                MODEL_CALLS
                    .lock()
                    .unwrap()
                    .push(format!("local {line} {headers:?} {body}"));
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
                let events = [
                    "data: {\"model\":\"llama3.1:8b\",\"choices\":[{\"delta\":{\"content\":\"hello \"}}]}\n\n",
                    "data: {\"model\":\"llama3.1:8b\",\"choices\":[{\"delta\":{\"content\":\"from llama\"}}]}\n\n",
                    "data: {\"model\":\"llama3.1:8b\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34}}\n\n",
                    "data: [DONE]\n\n",
                ];
                for e in events {
                    let _ = c.write_all(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes());
                    let _ = c.flush();
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                let _ = c.write_all(b"0\r\n\r\n");
            });
        }
    });
    addr
}

/// issue 14, end to end: an agent in the guest calls an OpenAI-compatible model on api.test
/// (routed to a local backend standing in for Ollama, streamed) and Anthropic's messages API
/// (sent to the cloud with the real key); the usage log gets both calls with tokens and cost,
/// the event log shows each plugin's decision, and the budget gate answers 429 once spent.
#[test]
fn model_plugins_end_to_end() {
    let py = python_image();
    let dir = tempfile::tempdir().unwrap();
    let (https, ca) = https_upstream_with(dir.path(), cloud_model_api);
    let backend = local_backend();
    let usage = dir.path().join("usage.jsonl");
    let events = dir.path().join("events.jsonl");
    let script = format!(
        r#"
import json, os, urllib.request, urllib.error
key = os.environ["API_KEY"]
def post(path, body, headers):
    req = urllib.request.Request("https://api.test:{https}" + path, data=json.dumps(body).encode(),
                                 headers={{"Content-Type": "application/json", **headers}})
    try:
        return urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as e:
        return e
out = {{}}
# The backend is the proxy's to reach, not the guest's.
try:
    out["backend_direct"] = urllib.request.urlopen("http://{backend}/v1/models", timeout=10).status
except urllib.error.HTTPError as e:
    out["backend_direct"] = e.code
except Exception as e:
    out["backend_direct"] = "error"
r = post("/v1/chat/completions", {{"model": "gpt-4o", "stream": True, "messages": [{{"role": "user", "content": "hi"}}]}},
         {{"Authorization": "Bearer " + key}})
text = ""
for line in r:
    line = line.decode().strip()
    if line.startswith("data: {{"):
        for c in json.loads(line[6:]).get("choices", []):
            text += c.get("delta", {{}}).get("content", "")
out["routed"] = [r.status, text]
r = post("/api/v1/chat/completions", {{"model": "openai/gpt-4o-mini", "messages": [{{"role": "user", "content": "hi"}}]}},
         {{"Authorization": "Bearer " + key}})
out["openrouter"] = [r.status, json.loads(r.read())["choices"][0]["message"]["content"]]
r = post("/v1/messages", {{"model": "claude-3-5-haiku-20241022", "max_tokens": 10, "stream": True, "messages": [{{"role": "user", "content": "hi"}}]}},
         {{"x-api-key": key, "anthropic-version": "2023-06-01"}})
text = ""
for line in r:
    line = line.decode().strip()
    if line.startswith("data: {{"):
        text += json.loads(line[6:]).get("delta", {{}}).get("text", "")
out["cloud"] = [r.status, text]
r = post("/v1/messages", {{"model": "claude-3-5-haiku-20241022", "max_tokens": 10, "messages": []}}, {{"x-api-key": key}})
out["over_budget"] = [r.status, json.loads(r.read())]
print(json.dumps(out))
"#
    );
    let route = format!("api.test/gpt-4o=llama3.1:8b@{backend}");
    let secret = format!("API_KEY={SECRET}@api.test");
    let out = ml(&[
        "run",
        "--image",
        py,
        "--add-host",
        "api.test:127.0.0.1",
        "--allow-private-host",
        "127.0.0.1",
        "--allow-host",
        "api.test",
        "--secret",
        &secret,
        "--local-model-route",
        &route,
        "--usage-log-path",
        usage.to_str().unwrap(),
        "--budget-limit-usd",
        "0.005",
        "--event-log",
        events.to_str().unwrap(),
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
    let got: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        got["routed"],
        serde_json::json!([200, "hello from llama"]),
        "{got}"
    );
    assert_eq!(
        got["openrouter"],
        serde_json::json!([200, "hello from openrouter"]),
        "{got}"
    );
    assert_eq!(
        got["cloud"],
        serde_json::json!([200, "hello from the cloud"]),
        "{got}"
    );
    assert_eq!(got["over_budget"][0], 429, "{got}");
    assert_eq!(
        got["over_budget"][1]["error"]["code"], "budget_exceeded",
        "{got}"
    );
    // Refused at the address (the stack resets it) or by the allow-list: never reached.
    assert!(
        got["backend_direct"] == "error" || got["backend_direct"] == 403,
        "{got}"
    );

    let calls = MODEL_CALLS.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "{calls:?}");
    let local = calls
        .iter()
        .find(|c| c.starts_with("local "))
        .expect("the routed call");
    assert!(
        local.contains("POST /v1/chat/completions") && local.contains(r#""model":"llama3.1:8b""#),
        "{local}"
    );
    assert!(
        !local.contains("authorization")
            && !local.contains(SECRET)
            && !local.contains("SANDBOX_SECRET"),
        "{local}"
    );
    let cloud = calls
        .iter()
        .find(|c| c.starts_with("cloud "))
        .expect("the cloud call");
    assert!(
        cloud.contains(SECRET),
        "the cloud call lacks the real key: {cloud}"
    );

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&usage)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["model"], "llama3.1:8b");
    assert_eq!(
        (
            lines[0]["input_tokens"].as_u64(),
            lines[0]["output_tokens"].as_u64()
        ),
        (Some(12), Some(34))
    );
    assert_eq!(lines[0]["cost_source"], "local_backend");
    // OpenRouter-style: the cost the provider reported.
    assert_eq!(lines[1]["model"], "openai/gpt-4o-mini");
    assert_eq!(lines[1]["cost_source"], "provider");
    assert_eq!(lines[1]["cost_usd"].as_f64(), Some(0.001));
    assert_eq!(
        (
            lines[1]["input_tokens"].as_u64(),
            lines[1]["output_tokens"].as_u64()
        ),
        (Some(40), Some(60))
    );
    // Anthropic, streamed: priced from the table (1000 in, 2000 out of claude-3-5-haiku).
    assert_eq!(lines[2]["provider"], "api.test");
    assert_eq!(lines[2]["cost_source"], "price_table");
    assert_eq!(
        (
            lines[2]["input_tokens"].as_u64(),
            lines[2]["output_tokens"].as_u64()
        ),
        (Some(1000), Some(2000))
    );
    assert!(
        (lines[2]["cost_usd"].as_f64().unwrap() - 0.0088).abs() < 1e-9,
        "{lines:?}"
    );

    let log = std::fs::read_to_string(&events).unwrap();
    assert!(!log.contains(SECRET) && !std::fs::read_to_string(&usage).unwrap().contains(SECRET));
    let kinds: Vec<(String, String)> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|e| {
            (
                e["event_type"].as_str().unwrap_or("").to_string(),
                e["plugin"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for want in [
        ("route_decision", "local_model_router"),
        ("request_transform", "local_model_router"),
        ("request_transform", "secret_injector"),
        ("response_transform", "usage_logger"),
        ("gate_decision", "budget_gate"),
        ("gate_decision", "host_filter"),
    ] {
        assert!(
            kinds.iter().any(|(k, p)| k == want.0 && p == want.1),
            "no {want:?} in {kinds:?}"
        );
    }
}

/// Bad plugin settings fail with a clear message before anything boots, and leave nothing (no
/// usage log file) behind.
#[test]
fn plugin_flags_are_checked_before_boot() {
    let dir = tempfile::tempdir().unwrap();
    let usage = dir.path().join("usage.jsonl");
    let usage = usage.to_str().unwrap();
    let plugins = dir.path().join("plugins.json");
    std::fs::write(
        &plugins,
        r#"{"network": {"plugins": [{"type": "cost_cap"}]}}"#,
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--budget-limit-usd", "5"], "needs --usage-log-path"),
        (
            vec!["--usage-log-path", usage, "--budget-limit-usd", "0"],
            "positive",
        ),
        (
            vec!["--local-model-route", "openrouter.ai"],
            "SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL",
        ),
        (
            vec!["--local-model-route", "a.test/m=t@nohost"],
            "HOST:PORT",
        ),
        (
            vec!["--local-model-backend", "127.0.0.1:11434"],
            "needs at least one --local-model-route",
        ),
        (
            vec!["--usage-log-path", "/nonexistent-dir/u.jsonl"],
            "does not exist",
        ),
        (
            vec![
                "--usage-log-path",
                usage,
                "--price-file",
                "/nonexistent.json",
            ],
            "price file",
        ),
        (
            vec!["--plugins-file", plugins.to_str().unwrap()],
            "unknown plugin type \"cost_cap\"",
        ),
        (
            vec!["--no-network", "--usage-log-path", usage],
            "--no-network",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["run", "--image", BUSYBOX];
        args.extend(&flags);
        args.extend(["--", "true"]);
        let t = std::time::Instant::now();
        let out = run(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(want), "{flags:?}: {err}");
        // Refused while checking, not after a boot.
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{flags:?} took {:?}",
            t.elapsed()
        );
    }
    assert!(!std::path::Path::new(usage).exists());
}

#[test]
fn redirects_followed_on_the_host_within_the_allow_list() {
    let py = python_image();
    let landing = http_server(|head| {
        let path = request_path(head);
        let body = format!("landed {path}\n");
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    });
    let redirector = http_server(move |head| {
        let path = request_path(head);
        let to = match path {
            "/elsewhere" => format!("http://third.test:{landing}/x"),
            _ => format!("http://other.test:{landing}/final"),
        };
        format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    });
    let sb = Sandbox::detached_from(
        py,
        &[
            "--add-host",
            "api.test:127.0.0.1",
            "--add-host",
            "other.test:127.0.0.1",
            "--add-host",
            "third.test:127.0.0.1",
            "--allow-private-host",
            "127.0.0.1",
            "--allow-host",
            "api.test",
            "--allow-host",
            "other.test",
            "--follow-redirects",
        ],
        &["sleep", "600"],
    );
    // curl without -L: the host followed the redirect, the guest sees where it landed.
    let o = sb.exec(&[
        "curl",
        "-sS",
        &format!("http://api.test:{redirector}/start"),
    ]);
    assert_eq!(stdout(&o), "landed /final\n", "{}", stderr(&o));
    // To a host off the allow-list: the guest gets the redirect itself.
    let o = sb.exec(&[
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &format!("http://api.test:{redirector}/elsewhere"),
    ]);
    assert_eq!(
        stdout(&o),
        format!("302 http://third.test:{landing}/x"),
        "{}",
        stderr(&o)
    );
}
