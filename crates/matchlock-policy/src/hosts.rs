//! Allow-lists of host patterns ([`AllowList`], whose patterns are [`HostPattern`]s from
//! `matchlock-api`) and the names the guest was told ([`NameTable`]).

pub use matchlock_api::hosts::{normalize, HostPattern};

/// An allow-list. Empty, it allows every host (Matchlock's rule: interception without a list
/// still applies hooks, secrets and the private-range block), unless it was made with
/// [`AllowList::deny_by_default`], which starts with nothing allowed and opens hosts one by one,
/// or made from patterns: a list that started by naming hosts stays closed when the last one is
/// deleted at run time. (Matchlock opens it to every host then, so revoking the last host an
/// agent could reach would hand it the whole network; its own acceptance test only clears a
/// list that started empty, which still opens again.)
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
        l.deny_when_empty = !l.patterns.is_empty();
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
                removed.push(self.patterns.remove(i).as_str().to_string());
            }
        }
        removed
    }

    /// The patterns, normalised.
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| p.as_str().to_string())
            .collect()
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
        // Deleting the last host of a deny-by-default list closes it again, and so does
        // deleting the last host of a list that started with hosts (revoking must not open).
        closed.remove(["example.com"]);
        assert!(!closed.allows("example.com"));
        let mut named = AllowList::new(["a.com"]).unwrap();
        assert!(!named.allows("b.com") && !named.is_open());
        named.remove(["a.com"]);
        assert!(!named.allows("a.com") && !named.allows("b.com") && !named.is_open());
        assert!(named.denies_when_empty());
        // A list that started empty (open) opens again once what was added is deleted
        // (Matchlock's "(empty: all hosts allowed)", which its acceptance test relies on).
        let mut plain = AllowList::default();
        plain.add(["a.com"]).unwrap();
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
        let mut t = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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

    /// The names the guest was told are at `addr`, sorted.
    pub fn names_at(&self, addr: std::net::IpAddr) -> Vec<String> {
        let mut names: Vec<String> = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, v)| v.contains(&addr))
            .map(|(k, _)| k.clone())
            .collect();
        names.sort();
        names
    }

    /// Whether the guest was told `name` is at `addr` (an IP literal is its own address).
    pub fn agrees(&self, name: &str, addr: std::net::IpAddr) -> bool {
        let name = normalize(name);
        if let Ok(ip) = name.parse::<std::net::IpAddr>() {
            return ip == addr;
        }
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&name)
            .is_some_and(|v| v.contains(&addr))
    }
}
