//! Secrets that never enter the sandbox: the guest sees a random placeholder; on the way out the
//! placeholder becomes the real value only in HTTPS requests to the secret's hosts (header values,
//! Basic credentials, the query string; plain HTTP only for a secret that allows it); a request
//! carrying the placeholder or the real value to any other host, anywhere (path, headers, query,
//! body), is refused; and on the way back, real values, and every encoding of them this module
//! produced, become placeholders again (an upstream that echoes a request cannot leak them).

use crate::hosts::AllowList;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// One secret. Its value is never printed by `Debug`.
pub struct Secret {
    /// Environment variable name in the guest.
    pub name: String,
    value: String,
    /// Hosts the real value may be sent to.
    pub hosts: AllowList,
    /// What the guest sees instead.
    pub placeholder: String,
    /// May also be injected into plain HTTP requests (in clear text).
    pub allow_http: bool,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("hosts", &self.hosts.patterns())
            .field("placeholder", &self.placeholder)
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

/// A placeholder shaped like Matchlock's: `SANDBOX_SECRET_` and 32 hex digits.
pub fn placeholder() -> String {
    let bytes: [u8; 16] = rand::random();
    format!("SANDBOX_SECRET_{}", hex::encode(bytes))
}

impl Secret {
    /// A secret with a fresh placeholder (or `custom`).
    /// `hosts` never allows everything by being empty: a secret goes only where it is named.
    pub fn new(name: &str, value: &str, hosts: AllowList, custom: Option<&str>) -> Secret {
        Secret {
            name: name.to_string(),
            value: value.to_string(),
            hosts: hosts.deny_by_default(),
            placeholder: custom
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .unwrap_or_else(placeholder),
            allow_http: false,
        }
    }

    /// Lets the value go in plain HTTP requests too, where anyone on the path can read it.
    pub fn allow_http(mut self, yes: bool) -> Secret {
        self.allow_http = yes;
        self
    }
}

/// Why a request was refused (never contains a secret value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    /// The secret's name.
    pub name: String,
    /// The host it was headed to.
    pub host: String,
    /// What made it a leak.
    pub why: LeakKind,
}

/// What makes sending a secret a leak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakKind {
    /// The host is not one the secret may go to.
    OtherHost,
    /// The request is plain HTTP and the secret does not allow clear text.
    Cleartext,
}

impl std::fmt::Display for Leak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Leak { name, host, why } = self;
        write!(f, "secret {name} may not be sent to {host}")?;
        if *why == LeakKind::Cleartext {
            write!(
                f,
                " over plain HTTP; use HTTPS, or allow clear text with --secret-over-http {name}"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Leak {}

/// Most encodings of values remembered for scrubbing (each a `Basic` credential the proxy
/// built); the oldest go first.
const MAX_PRODUCED: usize = 256;

/// All secrets of a sandbox.
#[derive(Debug, Default)]
pub struct Secrets {
    list: Vec<Secret>,
    /// Encodings of real values this module produced (a `Basic` credential's base64), each with
    /// what the guest had written in its place: an upstream that echoes one back must not hand
    /// the guest a decodable value.
    produced: std::sync::Mutex<std::collections::VecDeque<(Vec<u8>, Vec<u8>)>>,
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    if !contains(hay, from) {
        return None;
    }
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    Some(out)
}

/// A `Basic` credential's decoded `user:password`, if `value` is one.
fn basic(value: &[u8]) -> Option<Vec<u8>> {
    let s = std::str::from_utf8(value).ok()?;
    let (scheme, rest) = s.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    B64.decode(rest.trim()).ok()
}

impl Secrets {
    /// The set.
    pub fn new(list: Vec<Secret>) -> Secrets {
        Secrets {
            list,
            produced: Default::default(),
        }
    }

    fn remember(&self, real: Vec<u8>, guest: Vec<u8>) {
        let mut p = self.produced.lock().unwrap_or_else(|p| p.into_inner());
        if p.iter().any(|(r, _)| *r == real) {
            return;
        }
        if p.len() == MAX_PRODUCED {
            p.pop_front();
        }
        p.push_back((real, guest));
    }

    /// `(name, placeholder)` pairs for the guest's environment.
    pub fn env(&self) -> Vec<(String, String)> {
        self.list
            .iter()
            .map(|s| (s.name.clone(), s.placeholder.clone()))
            .collect()
    }

    /// Whether there are any.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Substitutes secrets into a request to `host`: header values (including `Basic`
    /// credentials) and the raw query. Refuses the request if a placeholder or a real value is
    /// headed to a host its secret does not allow (in the path, a header or the query; the body
    /// is checked as it streams, see [`Secrets::body_guard`]), or would be injected into a
    /// `cleartext` (plain HTTP) request its secret keeps to HTTPS. Returns the names of the
    /// secrets injected.
    pub fn apply_request(
        &self,
        host: &str,
        cleartext: bool,
        path: &[u8],
        headers: &mut [(String, Vec<u8>)],
        query: &mut Vec<u8>,
    ) -> Result<Vec<String>, Leak> {
        let mut injected = Vec::new();
        for s in &self.list {
            let mut used = false;
            let (ph, real) = (s.placeholder.as_bytes(), s.value.as_bytes());
            let allowed = s.hosts.allows(host);
            let leak = |why| Leak {
                name: s.name.clone(),
                host: crate::hosts::normalize(host),
                why,
            };
            if !allowed && (contains(path, ph) || contains(path, real)) {
                return Err(leak(LeakKind::OtherHost));
            }
            for (_, v) in headers.iter_mut() {
                let decoded = basic(v);
                let carries = |b: &[u8]| contains(b, ph) || contains(b, real);
                if !allowed {
                    if carries(v) || decoded.as_deref().is_some_and(carries) {
                        return Err(leak(LeakKind::OtherHost));
                    }
                    continue;
                }
                if let Some(new) = replace(v, ph, real) {
                    *v = new;
                    used = true;
                } else if let Some(new) = decoded.and_then(|d| replace(&d, ph, real)) {
                    let encoded = B64.encode(new).into_bytes();
                    let guest = std::str::from_utf8(v)
                        .ok()
                        .and_then(|t| t.trim().split_once(' '))
                        .map(|(_, b64)| b64.trim().as_bytes().to_vec())
                        .unwrap_or_default();
                    self.remember(encoded.clone(), guest);
                    let mut header = b"Basic ".to_vec();
                    header.extend_from_slice(&encoded);
                    *v = header;
                    used = true;
                }
            }
            if !allowed {
                if contains(query, ph) || contains(query, real) {
                    return Err(leak(LeakKind::OtherHost));
                }
            } else if let Some(new) = replace(query, ph, real) {
                *query = new;
                used = true;
            }
            if used && cleartext && !s.allow_http {
                return Err(leak(LeakKind::Cleartext));
            }
            if used {
                injected.push(s.name.clone());
            }
        }
        Ok(injected)
    }

    /// A streaming filter turning real values (and the encodings of them produced so far) back
    /// into what the guest wrote, for response bodies.
    pub fn scrubber(&self) -> Scrubber {
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = self
            .list
            .iter()
            .filter(|s| !s.value.is_empty())
            .map(|s| {
                (
                    s.value.as_bytes().to_vec(),
                    s.placeholder.as_bytes().to_vec(),
                )
            })
            .collect();
        let produced = self.produced.lock().unwrap_or_else(|p| p.into_inner());
        pairs.extend(produced.iter().filter(|(r, _)| !r.is_empty()).cloned());
        Scrubber {
            pairs,
            carry: Vec::new(),
        }
    }

    /// A streaming check of a request body headed to `host`: it fails as soon as the body
    /// carries the placeholder or the real value of a secret that may not go there, before
    /// the bytes that complete it are passed on. `None` when no secret needs watching.
    pub fn body_guard(&self, host: &str) -> Option<BodyGuard> {
        let watched: Vec<(Vec<u8>, Leak)> = self
            .list
            .iter()
            .filter(|s| !s.hosts.allows(host))
            .flat_map(|s| {
                let leak = Leak {
                    name: s.name.clone(),
                    host: crate::hosts::normalize(host),
                    why: LeakKind::OtherHost,
                };
                [s.placeholder.as_bytes(), s.value.as_bytes()]
                    .into_iter()
                    .filter(|n| !n.is_empty())
                    .map(move |n| (n.to_vec(), leak.clone()))
            })
            .collect();
        (!watched.is_empty()).then(|| BodyGuard {
            watched,
            carry: Vec::new(),
        })
    }

    /// Turns real values back into placeholders in one complete value (a response header).
    pub fn scrub(&self, value: &[u8]) -> Vec<u8> {
        let mut s = self.scrubber();
        let mut out = s.push(value);
        out.extend(s.finish());
        out
    }
}

/// Watches a request body for secrets headed where they may not go (see
/// [`Secrets::body_guard`]).
#[derive(Debug)]
pub struct BodyGuard {
    watched: Vec<(Vec<u8>, Leak)>,
    carry: Vec<u8>,
}

impl BodyGuard {
    /// Feeds a chunk; returns what can be passed on now (a tail that could begin a watched
    /// value is held back), or the leak it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>, Leak> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        if let Some((_, leak)) = self.watched.iter().find(|(n, _)| contains(&buf, n)) {
            return Err(leak.clone());
        }
        let longest = self.watched.iter().map(|(n, _)| n.len()).max().unwrap_or(1);
        // The longest tail that is a proper prefix of a watched value.
        let keep = (1..longest.min(buf.len() + 1))
            .rev()
            .find(|&k| {
                let tail = &buf[buf.len() - k..];
                self.watched.iter().any(|(n, _)| n.starts_with(tail))
            })
            .unwrap_or(0);
        self.carry = buf.split_off(buf.len() - keep);
        Ok(buf)
    }

    /// Ends the body; returns the held-back rest (which completes nothing).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.carry)
    }
}

/// Replaces real secret values with their placeholders across chunk boundaries: the tail that could
/// be the start of a value is held back until the next chunk (or [`Scrubber::finish`]).
#[derive(Debug)]
pub struct Scrubber {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    carry: Vec<u8>,
}

impl Scrubber {
    /// Feeds a chunk; returns what can be passed on now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.run(chunk, false)
    }

    /// Ends the stream; returns the held-back rest.
    pub fn finish(&mut self) -> Vec<u8> {
        self.run(&[], true)
    }

    /// A scrubber for the same values with nothing held back (for a separate stream).
    pub fn fresh(&self) -> Scrubber {
        Scrubber {
            pairs: self.pairs.clone(),
            carry: Vec::new(),
        }
    }

    fn run(&mut self, chunk: &[u8], last: bool) -> Vec<u8> {
        if self.pairs.is_empty() {
            let mut out = std::mem::take(&mut self.carry);
            out.extend_from_slice(chunk);
            return out;
        }
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'outer: while i < buf.len() {
            for (real, ph) in &self.pairs {
                if buf[i..].starts_with(real) {
                    out.extend_from_slice(ph);
                    i += real.len();
                    continue 'outer;
                }
            }
            let rest = &buf[i..];
            if !last
                && self
                    .pairs
                    .iter()
                    .any(|(r, _)| rest.len() < r.len() && r.starts_with(rest))
            {
                break;
            }
            out.push(buf[i]);
            i += 1;
        }
        self.carry = buf[i..].to_vec();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> (Secrets, String) {
        let s = Secret::new(
            "API_KEY",
            "sk-real-123",
            AllowList::new(["api.example.com"]).unwrap(),
            None,
        );
        let ph = s.placeholder.clone();
        (Secrets::new(vec![s]), ph)
    }

    #[test]
    fn placeholders_become_values_only_for_allowed_hosts() {
        let (secrets, ph) = set();
        assert!(ph.starts_with("SANDBOX_SECRET_") && ph.len() == 15 + 32);
        let mut h = vec![(
            "Authorization".to_string(),
            format!("Bearer {ph}").into_bytes(),
        )];
        let mut q = format!("key={ph}&x=1").into_bytes();
        secrets
            .apply_request("API.example.com:443", false, b"/", &mut h, &mut q)
            .unwrap();
        assert_eq!(h[0].1, b"Bearer sk-real-123");
        assert_eq!(q, b"key=sk-real-123&x=1");

        let basic = B64.encode(format!("user:{ph}"));
        let mut h = vec![(
            "authorization".to_string(),
            format!("Basic {basic}").into_bytes(),
        )];
        secrets
            .apply_request("api.example.com", false, b"/", &mut h, &mut Vec::new())
            .unwrap();
        assert_eq!(basic_decoded(&h[0].1), b"user:sk-real-123");

        for carried in [ph.clone(), "sk-real-123".to_string()] {
            let mut h = vec![("X-Key".to_string(), carried.clone().into_bytes())];
            let e = secrets
                .apply_request("evil.example.net", false, b"/", &mut h, &mut Vec::new())
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "secret API_KEY may not be sent to evil.example.net"
            );
            assert!(!e.to_string().contains("sk-real"));
            let mut q = format!("k={carried}").into_bytes();
            assert!(secrets
                .apply_request("evil.example.net", false, b"/", &mut [], &mut q)
                .is_err());
            let b = B64.encode(format!("u:{carried}"));
            let mut h = vec![(
                "Authorization".to_string(),
                format!("Basic {b}").into_bytes(),
            )];
            assert!(secrets
                .apply_request("evil.example.net", false, b"/", &mut h, &mut Vec::new())
                .is_err());
            let path = format!("/v1/{carried}/x").into_bytes();
            assert!(secrets
                .apply_request("evil.example.net", false, &path, &mut [], &mut Vec::new())
                .is_err());
        }
        // Unrelated requests pass untouched.
        let mut h = vec![("Accept".to_string(), b"*/*".to_vec())];
        secrets
            .apply_request(
                "evil.example.net",
                false,
                b"/",
                &mut h,
                &mut b"a=1".to_vec(),
            )
            .unwrap();
        assert!(!format!("{secrets:?}").contains("sk-real"));
    }

    fn basic_decoded(v: &[u8]) -> Vec<u8> {
        basic(v).unwrap()
    }

    #[test]
    fn responses_are_scrubbed_across_chunk_boundaries() {
        let (secrets, ph) = set();
        let body = b"echo: sk-real-123 and again sk-real-123!".to_vec();
        let want = String::from_utf8(body.clone())
            .unwrap()
            .replace("sk-real-123", &ph);
        for split in 0..body.len() {
            let mut s = secrets.scrubber();
            let mut out = s.push(&body[..split]);
            out.extend(s.push(&body[split..]));
            out.extend(s.finish());
            assert_eq!(String::from_utf8(out).unwrap(), want, "split at {split}");
        }
        // Byte by byte.
        let mut s = secrets.scrubber();
        let mut out = Vec::new();
        for b in &body {
            out.extend(s.push(&[*b]));
        }
        out.extend(s.finish());
        assert_eq!(String::from_utf8(out).unwrap(), want);
        // A prefix that never completes is released at the end.
        let mut s = secrets.scrubber();
        let mut out = s.push(b"sk-rea");
        out.extend(s.finish());
        assert_eq!(out, b"sk-rea");
        assert_eq!(
            secrets.scrub(b"x sk-real-123"),
            format!("x {ph}").into_bytes()
        );
    }

    /// Plain HTTP carries a secret only when the secret says so; a request that injects
    /// nothing is not affected.
    #[test]
    fn cleartext_injection_needs_the_secrets_consent() {
        let (secrets, ph) = set();
        let mut h = vec![(
            "Authorization".to_string(),
            format!("Bearer {ph}").into_bytes(),
        )];
        let e = secrets
            .apply_request("api.example.com", true, b"/", &mut h, &mut Vec::new())
            .unwrap_err();
        assert_eq!(e.why, LeakKind::Cleartext);
        let mut q = format!("k={ph}").into_bytes();
        assert!(secrets
            .apply_request("api.example.com", true, b"/", &mut [], &mut q)
            .is_err());
        let mut plain = vec![("Accept".to_string(), b"*/*".to_vec())];
        assert!(secrets
            .apply_request("api.example.com", true, b"/", &mut plain, &mut Vec::new())
            .is_ok());
        let s = Secret::new(
            "API_KEY",
            "sk-real-123",
            AllowList::new(["api.example.com"]).unwrap(),
            Some("PH-1"),
        )
        .allow_http(true);
        let secrets = Secrets::new(vec![s]);
        let mut h = vec![("Authorization".to_string(), b"Bearer PH-1".to_vec())];
        secrets
            .apply_request("api.example.com", true, b"/", &mut h, &mut Vec::new())
            .unwrap();
        assert_eq!(h[0].1, b"Bearer sk-real-123");
    }

    /// A body to another host fails as soon as it completes a placeholder or value, wherever
    /// the chunks split it, and nothing of the completing chunk is passed on.
    #[test]
    fn request_bodies_to_other_hosts_are_watched_across_chunks() {
        let (secrets, ph) = set();
        assert!(secrets.body_guard("api.example.com").is_none());
        for needle in [ph.as_str(), "sk-real-123"] {
            let body = format!("{{\"data\": \"{needle}\"}}").into_bytes();
            for split in 0..body.len() {
                let mut g = secrets.body_guard("evil.example.net").unwrap();
                let mut sent = Vec::new();
                let r = g
                    .push(&body[..split])
                    .and_then(|out| {
                        sent.extend(out);
                        g.push(&body[split..])
                    })
                    .map(|out| sent.extend(out));
                let e = r.unwrap_err();
                assert_eq!((e.name.as_str(), e.why), ("API_KEY", LeakKind::OtherHost));
                assert!(!contains(&sent, needle.as_bytes()), "split {split}");
            }
        }
        // A body that only looks like the start of one is passed on whole.
        let mut g = secrets.body_guard("evil.example.net").unwrap();
        let mut out = g.push(b"hello sk-re").unwrap();
        out.extend(g.push(b"al").unwrap());
        out.extend(g.finish());
        assert_eq!(out, b"hello sk-real");
    }

    /// The base64 `Basic` credential the proxy built holds the value in an encoding the plain
    /// scrubber would miss; echoed back, it turns into what the guest sent.
    #[test]
    fn basic_credentials_the_proxy_built_are_scrubbed_back() {
        let (secrets, ph) = set();
        let guest_b64 = B64.encode(format!("user:{ph}"));
        let mut h = vec![(
            "Authorization".to_string(),
            format!("Basic {guest_b64}").into_bytes(),
        )];
        secrets
            .apply_request("api.example.com", false, b"/", &mut h, &mut Vec::new())
            .unwrap();
        let sent = String::from_utf8(h[0].1.clone()).unwrap();
        let real_b64 = sent.strip_prefix("Basic ").unwrap();
        let echoed = format!("{{\"auth\": \"Basic {real_b64}\"}}");
        let back = String::from_utf8(secrets.scrub(echoed.as_bytes())).unwrap();
        assert_eq!(back, format!("{{\"auth\": \"Basic {guest_b64}\"}}"));
    }
}
