//! Secrets that never enter the sandbox: the guest sees a random placeholder; on the way out the
//! placeholder becomes the real value only in requests to the secret's hosts (header values,
//! Basic credentials, the query string); a request carrying the placeholder or the real value to any
//! other host is refused; and on the way back, real values in responses become placeholders again
//! (an upstream that echoes headers cannot leak them into the guest).

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
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("hosts", &self.hosts.patterns())
            .field("placeholder", &self.placeholder)
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
        }
    }
}

/// Why a request was refused (never contains a secret value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret {name} may not be sent to {host}")]
pub struct Leak {
    /// The secret's name.
    pub name: String,
    /// The host it was headed to.
    pub host: String,
}

/// All secrets of a sandbox.
#[derive(Debug, Default)]
pub struct Secrets {
    list: Vec<Secret>,
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
        Secrets { list }
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
    /// headed to a host its secret does not allow. Returns the names of the secrets injected.
    pub fn apply_request(
        &self,
        host: &str,
        headers: &mut [(String, Vec<u8>)],
        query: &mut Vec<u8>,
    ) -> Result<Vec<String>, Leak> {
        let mut injected = Vec::new();
        for s in &self.list {
            let mut used = false;
            let (ph, real) = (s.placeholder.as_bytes(), s.value.as_bytes());
            let allowed = s.hosts.allows(host);
            let leak = || Leak {
                name: s.name.clone(),
                host: crate::hosts::normalize(host),
            };
            for (_, v) in headers.iter_mut() {
                let decoded = basic(v);
                let carries = |b: &[u8]| contains(b, ph) || contains(b, real);
                if !allowed {
                    if carries(v) || decoded.as_deref().is_some_and(carries) {
                        return Err(leak());
                    }
                    continue;
                }
                if let Some(new) = replace(v, ph, real) {
                    *v = new;
                    used = true;
                } else if let Some(new) = decoded.and_then(|d| replace(&d, ph, real)) {
                    *v = format!("Basic {}", B64.encode(new)).into_bytes();
                    used = true;
                }
            }
            if !allowed {
                if contains(query, ph) || contains(query, real) {
                    return Err(leak());
                }
            } else if let Some(new) = replace(query, ph, real) {
                *query = new;
                used = true;
            }
            if used {
                injected.push(s.name.clone());
            }
        }
        Ok(injected)
    }

    /// A streaming filter turning real values back into placeholders in response bodies.
    pub fn scrubber(&self) -> Scrubber {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = self
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
        Scrubber {
            pairs,
            carry: Vec::new(),
        }
    }

    /// Turns real values back into placeholders in one complete value (a response header).
    pub fn scrub(&self, value: &[u8]) -> Vec<u8> {
        let mut s = self.scrubber();
        let mut out = s.push(value);
        out.extend(s.finish());
        out
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
            .apply_request("API.example.com:443", &mut h, &mut q)
            .unwrap();
        assert_eq!(h[0].1, b"Bearer sk-real-123");
        assert_eq!(q, b"key=sk-real-123&x=1");

        let basic = B64.encode(format!("user:{ph}"));
        let mut h = vec![(
            "authorization".to_string(),
            format!("Basic {basic}").into_bytes(),
        )];
        secrets
            .apply_request("api.example.com", &mut h, &mut Vec::new())
            .unwrap();
        assert_eq!(basic_decoded(&h[0].1), b"user:sk-real-123");

        for carried in [ph.clone(), "sk-real-123".to_string()] {
            let mut h = vec![("X-Key".to_string(), carried.clone().into_bytes())];
            let e = secrets
                .apply_request("evil.example.net", &mut h, &mut Vec::new())
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "secret API_KEY may not be sent to evil.example.net"
            );
            assert!(!e.to_string().contains("sk-real"));
            let mut q = format!("k={carried}").into_bytes();
            assert!(secrets
                .apply_request("evil.example.net", &mut [], &mut q)
                .is_err());
            let b = B64.encode(format!("u:{carried}"));
            let mut h = vec![(
                "Authorization".to_string(),
                format!("Basic {b}").into_bytes(),
            )];
            assert!(secrets
                .apply_request("evil.example.net", &mut h, &mut Vec::new())
                .is_err());
        }
        // Unrelated requests pass untouched.
        let mut h = vec![("Accept".to_string(), b"*/*".to_vec())];
        secrets
            .apply_request("evil.example.net", &mut h, &mut b"a=1".to_vec())
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
}
