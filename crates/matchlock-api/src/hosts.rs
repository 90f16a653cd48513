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
