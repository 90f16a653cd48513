//! `ADD https://…`: the file fetched on the host, as BuildKit fetches it, under the build's own
//! network policy. The host makes this request itself, not a sandbox, so it checks what a
//! sandbox's traffic is checked against: the `--allow-host` list, and for every address the
//! name resolves to (on each redirect too) the address rule, which blocks loopback, private,
//! link-local and metadata ranges and the host's own addresses unless `--allow-private-host`
//! opens one. The connection goes to the address that was checked, never a second lookup.

use matchlock_api::request::NetworkRequest;
use matchlock_policy::hosts::AllowList;
use matchlock_policy::AddressPolicy;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use tokio::io::AsyncWriteExt;

/// Redirects followed before giving up, as curl's default.
const MAX_REDIRECTS: usize = 10;

/// Who a host-side fetch may reach: the build's network policy.
pub struct Egress {
    /// `--allow-host`; `None` when every host is allowed.
    hosts: Option<AllowList>,
    address: AddressPolicy,
    /// `--add-host` names, which resolve to their given address.
    names: Vec<(String, IpAddr)>,
}

impl Egress {
    /// The policy of a build with `network` (`None`: `--no-network`, which refuses) and the
    /// extra `/etc/hosts` entries `(address, name)`.
    pub fn new(
        network: Option<&NetworkRequest>,
        add_hosts: &[(String, String)],
    ) -> Result<Option<Egress>, String> {
        let Some(n) = network else {
            return Ok(None);
        };
        let ic = &n.intercept;
        let hosts = if ic.allowed_hosts.is_empty() && !ic.deny_by_default {
            None
        } else {
            let mut list = AllowList::new(ic.allowed_hosts.iter().map(|h| h.as_str()))
                .map_err(|e| format!("--allow-host: {e}"))?;
            if ic.deny_by_default {
                list = list.deny_by_default();
            }
            Some(list)
        };
        Ok(Some(Egress {
            hosts,
            address: AddressPolicy {
                allow: n.allow_private_hosts.clone(),
                allow_private_ranges: n.allow_private_ranges,
                host_addrs: matchlock_policy::address::host_addresses(),
            },
            names: add_hosts
                .iter()
                .filter_map(|(ip, name)| Some((name.to_ascii_lowercase(), ip.parse().ok()?)))
                .collect(),
        }))
    }

    /// The address to connect to for `host:port`: the first the name resolves to that the
    /// address rule lets out, else why none may be reached.
    /// `host` is bare (an IPv6 address without its URL brackets).
    async fn address(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        if let Some(list) = &self.hosts {
            if !list.allows(host) {
                return Err(format!(
                    "{host} is not allowed (the build's --allow-host list does not name it)"
                ));
            }
        }
        let candidates: Vec<IpAddr> = if let Ok(ip) = host.parse::<IpAddr>() {
            vec![ip]
        } else if let Some((_, ip)) = self
            .names
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(host))
        {
            vec![*ip]
        } else {
            tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?
                .map(|a| a.ip())
                .collect()
        };
        let mut why = None;
        for ip in candidates {
            match self.address.check(ip) {
                Ok(()) => return Ok(SocketAddr::new(ip, port)),
                Err(blocked) => why = Some(blocked.to_string()),
            }
        }
        Err(why.unwrap_or_else(|| format!("{host} has no address")))
    }
}

/// What a fetch got.
#[derive(Debug)]
pub struct Fetched {
    /// `Last-Modified`, seconds since the epoch, when the server sent one.
    pub mtime: Option<u64>,
    /// `sha256:<hex>` of the content.
    pub digest: String,
}

/// Fetches `url` (http or https) into `out` under `egress`, following redirects (each hop
/// checked again), at most `max_bytes` of it; an error says what was refused or failed.
pub async fn fetch(
    url: &str,
    egress: &Egress,
    max_bytes: u64,
    out: &mut tokio::fs::File,
) -> Result<Fetched, String> {
    let mut url = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    for _ in 0..=MAX_REDIRECTS {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{url}: only http and https URLs can be fetched"));
        }
        // The name bare: a URL writes an IPv6 address in brackets.
        let host = url
            .host_str()
            .ok_or_else(|| format!("{url}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url
            .port_or_known_default()
            .ok_or_else(|| format!("{url}: no port"))?;
        let addr = egress
            .address(&host, port)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        // One client per hop, pinned to the checked address: reqwest neither resolves the
        // name again nor follows a redirect by itself.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .resolve(&host, addr)
            .connect_timeout(std::time::Duration::from_secs(30))
            // A server that stops sending fails the step instead of holding the build.
            .read_timeout(std::time::Duration::from_secs(60))
            .user_agent(concat!("matchlock-build/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("{url}: {e}"))?;
        let mut resp = client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        if status.is_redirection() {
            let to = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| format!("{url}: {status} without a Location"))?;
            url = url
                .join(to)
                .map_err(|e| format!("{url}: Location {to}: {e}"))?;
            continue;
        }
        if !status.is_success() {
            return Err(format!("{url}: the server answered {status}"));
        }
        let mtime = resp
            .headers()
            .get(reqwest::header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        let too_big = || {
            format!(
                "{url}: larger than {} MiB (the build's --disk-size)",
                max_bytes >> 20
            )
        };
        if resp.content_length().is_some_and(|n| n > max_bytes) {
            return Err(too_big());
        }
        let mut sha = Sha256::new();
        let mut got: u64 = 0;
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            got += chunk.len() as u64;
            if got > max_bytes {
                return Err(too_big());
            }
            sha.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| format!("writing what {url} sent: {e}"))?;
        }
        out.flush().await.map_err(|e| format!("{url}: {e}"))?;
        return Ok(Fetched {
            mtime,
            digest: format!("sha256:{}", hex::encode(sha.finalize())),
        });
    }
    Err(format!("{url}: more than {MAX_REDIRECTS} redirects"))
}

/// The file name `ADD URL DIR/` gives: the URL path's last segment.
pub fn file_name(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    let last = u.path_segments()?.next_back()?.to_string();
    (!last.is_empty() && last != "." && last != "..").then_some(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_come_from_the_path() {
        assert_eq!(
            file_name("https://example.com/releases/v1/tool.tar.gz?x=1").as_deref(),
            Some("tool.tar.gz")
        );
        assert_eq!(file_name("https://example.com/"), None);
        assert_eq!(file_name("https://example.com"), None);
    }

    /// A loopback server that answers every request with `response`; its port.
    fn serve(response: &'static [u8]) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = std::io::Read::read(&mut c, &mut buf);
                let _ = std::io::Write::write_all(&mut c, response);
            }
        });
        port
    }

    #[tokio::test]
    async fn downloads_are_bounded() {
        let mut n = NetworkRequest::default();
        n.allow_private_hosts.push("127.0.0.1".parse().unwrap());
        let egress = Egress::new(Some(&n), &[]).unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fetch_to = |port: u16, max: u64| {
            let path = dir.path().join(format!("{port}-{max}"));
            let egress = &egress;
            async move {
                let mut f = tokio::fs::File::create(&path).await.unwrap();
                fetch(&format!("http://127.0.0.1:{port}/f"), egress, max, &mut f).await
            }
        };
        // Said up front, and found on the way (no length given).
        let sized = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\nConnection: close\r\n\r\n0123456789abcdefghij");
        let unsized_ = serve(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n0123456789abcdefghij");
        for port in [sized, unsized_] {
            let e = fetch_to(port, 10).await.unwrap_err();
            assert!(e.contains("larger than"), "{e}");
            let got = fetch_to(port, 20).await.unwrap();
            assert_eq!(
                got.digest,
                format!(
                    "sha256:{}",
                    hex::encode(Sha256::digest(b"0123456789abcdefghij"))
                )
            );
        }
        let missing =
            serve(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let e = fetch_to(missing, 10).await.unwrap_err();
        assert!(e.contains("404"), "{e}");
    }

    #[tokio::test]
    async fn addresses_are_checked_before_anything_connects() {
        let mut n = NetworkRequest::default();
        let open = Egress::new(Some(&n), &[]).unwrap().unwrap();
        for host in ["127.0.0.1", "169.254.169.254", "::1", "10.0.0.1"] {
            let e = open.address(host, 80).await.unwrap_err();
            assert!(e.contains("blocked"), "{host}: {e}");
        }
        // A name the user mapped with --add-host still meets the address rule.
        let mapped = Egress::new(Some(&n), &[("127.0.0.1".into(), "api.test".into())])
            .unwrap()
            .unwrap();
        assert!(mapped.address("api.test", 80).await.is_err());
        n.allow_private_hosts.push("127.0.0.1".parse().unwrap());
        let opened = Egress::new(Some(&n), &[("127.0.0.1".into(), "api.test".into())])
            .unwrap()
            .unwrap();
        assert_eq!(
            opened.address("api.test", 8080).await.unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        n.intercept
            .allowed_hosts
            .push(matchlock_api::hosts::HostPattern::parse("other.test").unwrap());
        let listed = Egress::new(Some(&n), &[("127.0.0.1".into(), "api.test".into())])
            .unwrap()
            .unwrap();
        let e = listed.address("api.test", 80).await.unwrap_err();
        assert!(e.contains("not allowed"), "{e}");
        assert!(Egress::new(None, &[]).unwrap().is_none());
    }
}
