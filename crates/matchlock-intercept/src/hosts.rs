//! Host names and the allow-list globs of `--allow-host` (Matchlock's forms: `*`, `*.example.com`,
//! `example.*`, `api-*.example.com`), matched case-insensitively with trailing dots and ports
//! removed, which Matchlock does not do.

/// A host as the policy sees it: lower case, no trailing dot, no port, IPv6 without brackets.
pub fn normalize(host: &str) -> String {
    let h = host.trim();
    let h = if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port or [v6]
        rest.split(']').next().unwrap_or(rest)
    } else if h.matches(':').count() == 1 {
        // name:port or v4:port (a bare IPv6 address has several colons and no port)
        h.split(':').next().unwrap_or(h)
    } else {
        h
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    pattern: String,
}

impl HostPattern {
    /// Parses a pattern; empty ones and ones with characters no host name has are refused.
    pub fn parse(p: &str) -> Result<HostPattern, String> {
        let pattern = normalize(p);
        if pattern.is_empty() {
            return Err("empty host pattern".into());
        }
        if !pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '*' | ':'))
        {
            return Err(format!("invalid host pattern '{p}'"));
        }
        Ok(HostPattern { pattern })
    }

    /// The normalised pattern.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether `host` (normalised here) matches.
    pub fn matches(&self, host: &str) -> bool {
        glob(&self.pattern, &normalize(host))
    }
}

/// `*` matches any run of characters, dots included, except that a leading `*.` requires at least
/// one label (so `*.example.com` does not match `example.com` itself).
fn glob(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if !pattern.contains('*') {
        return pattern == host;
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !host.starts_with(first) || !host.ends_with(last) || host.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &host[first.len()..host.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    // A leading "*." needs a non-empty label before the suffix.
    !(pattern.starts_with("*.") && host.len() <= last.len())
}

/// An allow-list. Empty, it allows every host (Matchlock's rule: interception without a list
/// still applies hooks, secrets and the private-range block), unless it was made with
/// [`AllowList::deny_by_default`], which starts with nothing allowed and opens hosts one by one.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    patterns: Vec<HostPattern>,
    deny_when_empty: bool,
}

impl AllowList {
    /// A list from patterns.
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(patterns: I) -> Result<AllowList, String> {
        let mut l = AllowList::default();
        l.add(patterns)?;
        Ok(l)
    }

    /// The same list, allowing nothing while it is empty.
    pub fn deny_by_default(mut self) -> AllowList {
        self.deny_when_empty = true;
        self
    }

    /// Whether an empty list denies everything.
    pub fn denies_when_empty(&self) -> bool {
        self.deny_when_empty
    }

    /// Whether `host` is allowed.
    pub fn allows(&self, host: &str) -> bool {
        if self.patterns.is_empty() {
            return !self.deny_when_empty;
        }
        self.patterns.iter().any(|p| p.matches(host))
    }

    /// Whether every host is allowed (an empty list that does not deny, or `*`): then traffic
    /// that is not HTTP is relayed as is, as Matchlock's passthrough does.
    pub fn is_open(&self) -> bool {
        (self.patterns.is_empty() && !self.deny_when_empty)
            || self.patterns.iter().any(|p| p.as_str() == "*")
    }

    /// Adds patterns (trimmed, de-duplicated); returns those that were new.
    pub fn add<I: IntoIterator<Item = S>, S: AsRef<str>>(
        &mut self,
        patterns: I,
    ) -> Result<Vec<String>, String> {
        let mut added = Vec::new();
        for p in patterns {
            if p.as_ref().trim().is_empty() {
                continue;
            }
            let p = HostPattern::parse(p.as_ref())?;
            if !self.patterns.contains(&p) {
                added.push(p.as_str().to_string());
                self.patterns.push(p);
            }
        }
        Ok(added)
    }

    /// Removes patterns; returns those that were present.
    pub fn remove<I: IntoIterator<Item = S>, S: AsRef<str>>(&mut self, patterns: I) -> Vec<String> {
        let mut removed = Vec::new();
        for p in patterns {
            let n = normalize(p.as_ref());
            if let Some(i) = self.patterns.iter().position(|x| x.as_str() == n) {
                removed.push(self.patterns.remove(i).pattern);
            }
        }
        removed
    }

    /// The patterns, normalised.
    pub fn patterns(&self) -> Vec<String> {
        self.patterns.iter().map(|p| p.pattern.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, h: &str) -> bool {
        HostPattern::parse(p).unwrap().matches(h)
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize("API.Example.COM."), "api.example.com");
        assert_eq!(normalize("example.com:443"), "example.com");
        assert_eq!(normalize("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(normalize("2001:db8::1"), "2001:db8::1");
        assert_eq!(normalize("10.0.0.1:80"), "10.0.0.1");
    }

    #[test]
    fn glob_forms() {
        assert!(m("*", "anything.example"));
        assert!(m("*.example.com", "a.example.com"));
        assert!(m("*.example.com", "a.b.example.com"));
        assert!(!m("*.example.com", "example.com"));
        assert!(!m("*.example.com", "badexample.com"));
        assert!(m("example.*", "example.org"));
        assert!(!m("example.*", "example"));
        assert!(m("api-*.example.com", "api-eu.example.com"));
        assert!(m("api-*.example.com", "API-us-1.Example.com."));
        assert!(!m("api-*.example.com", "api.example.com"));
        assert!(!m("api-*.example.com", "api-eu.example.org"));
        assert!(m("Example.com", "example.COM:443"));
        assert!(!m("example.com", "example.com.evil.net"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxcyyb"));
    }

    #[test]
    fn lists() {
        let mut l = AllowList::new(["api.openai.com", "*.example.com"]).unwrap();
        assert!(l.allows("API.openai.com"));
        assert!(!l.allows("openai.com"));
        assert_eq!(
            l.add([" x.com ", "api.openai.com", ""]).unwrap(),
            vec!["x.com"]
        );
        assert_eq!(l.remove(["X.com", "nope"]), vec!["x.com"]);
        assert!(AllowList::default().patterns().is_empty());
        assert!(HostPattern::parse("bad host").is_err());
    }

    #[test]
    fn empty_lists_allow_all_unless_deny_by_default() {
        let open = AllowList::default();
        assert!(open.allows("example.com") && open.is_open());
        let mut closed = AllowList::default().deny_by_default();
        assert!(!closed.allows("example.com") && !closed.is_open());
        closed.add(["example.com"]).unwrap();
        assert!(closed.allows("example.com") && !closed.allows("other.com"));
        assert!(!closed.is_open());
        // Deleting the last host of a deny-by-default list closes it again; of a plain list,
        // opens it (Matchlock's "(empty: all hosts allowed)").
        closed.remove(["example.com"]);
        assert!(!closed.allows("example.com"));
        let mut plain = AllowList::new(["a.com"]).unwrap();
        assert!(!plain.allows("b.com") && !plain.is_open());
        plain.remove(["a.com"]);
        assert!(plain.allows("b.com") && plain.is_open());
        assert!(AllowList::new(["*"]).unwrap().is_open());
    }
}

/// What the guest was told each name resolves to (its guest-visible addresses), so a connection
/// can be checked against the name it claims in its Host header or SNI: a guest cannot resolve an
/// allowed name and then send traffic for it to an address of its choosing.
#[derive(Debug, Default)]
pub struct NameTable {
    names: std::sync::Mutex<std::collections::HashMap<String, Vec<std::net::IpAddr>>>,
}

/// Names remembered at most; the table is cleared when full.
const MAX_NAMES: usize = 4096;

impl NameTable {
    /// Records that `name` resolved to `addrs` for the guest (added to what it had).
    pub fn record(&self, name: &str, addrs: &[std::net::IpAddr]) {
        let mut t = self.names.lock().unwrap();
        if t.len() >= MAX_NAMES {
            t.clear();
        }
        let e = t.entry(normalize(name)).or_default();
        for a in addrs {
            if !e.contains(a) {
                e.push(*a);
            }
        }
    }

    /// Whether the guest was told `name` is at `addr` (an IP literal is its own address).
    pub fn agrees(&self, name: &str, addr: std::net::IpAddr) -> bool {
        let name = normalize(name);
        if let Ok(ip) = name.parse::<std::net::IpAddr>() {
            return ip == addr;
        }
        self.names
            .lock()
            .unwrap()
            .get(&name)
            .is_some_and(|v| v.contains(&addr))
    }
}
