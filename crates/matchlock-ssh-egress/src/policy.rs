//! What SSH egress allows: which servers (`HOST[:PORT]`), and which commands on them.
//!
//! A remote command is a string the upstream server hands to the account's shell, so a rule
//! that allows `git-upload-pack '*'` must not also allow `git-upload-pack 'x'; rm -rf ~`.
//! Commands are therefore split into words as a POSIX shell would (single and double quotes,
//! backslashes), and one with an unquoted shell operator or expansion (`;`, `|`, `&`, `$`, a
//! backquote, redirections, a newline, globs) is refused whatever the rules say. What is left is
//! matched against the rules: `allow:PATTERN` / `deny:PATTERN`, `*` and `?` globs over the whole
//! command, the first match deciding; with rules but no match, the command is refused.

/// One `allow:`/`deny:` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRule {
    /// Allow (else deny).
    pub allow: bool,
    /// Glob over the whole command.
    pub pattern: String,
}

impl std::str::FromStr for ExecRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (allow, pattern) = if let Some(p) = s.strip_prefix("allow:") {
            (true, p)
        } else if let Some(p) = s.strip_prefix("deny:") {
            (false, p)
        } else {
            return Err(format!(
                "exec rule '{s}' must be allow:PATTERN or deny:PATTERN, e.g. \"allow:git-upload-pack 'org/*.git'\""
            ));
        };
        if pattern.trim().is_empty() || pattern.len() > 1024 {
            return Err(format!(
                "exec rule '{s}' needs a pattern of 1 to 1024 characters"
            ));
        }
        Ok(ExecRule {
            allow,
            pattern: pattern.to_string(),
        })
    }
}

/// A server SSH egress may reach: a host (glob) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Host name or glob (`*.example.com`), lowercase.
    pub host: String,
    /// Port (22 by default).
    pub port: u16,
}

impl std::str::FromStr for Destination {
    type Err = String;

    /// `HOST[:PORT]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    format!("SSH destination '{s}': port '{p}' is not 1 to 65535")
                })?,
            ),
            None => (s, 22),
        };
        let host = host.trim().to_ascii_lowercase();
        if host.is_empty()
            || host.len() > 253
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.*_".contains(&b))
        {
            return Err(format!(
                "SSH destination '{s}' must be HOST[:PORT] (a name or a glob like *.example.com)"
            ));
        }
        Ok(Destination { host, port })
    }
}

impl Destination {
    /// Whether this entry covers `host` on `port`.
    pub fn covers(&self, host: &str, port: u16) -> bool {
        port == self.port && glob(self.host.as_bytes(), host.to_ascii_lowercase().as_bytes())
    }
}

fn glob(pattern: &[u8], s: &[u8]) -> bool {
    match (pattern.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&pattern[1..], s) || (!s.is_empty() && glob(pattern, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&pattern[1..], &s[1..]),
        _ => false,
    }
}

/// Refuses a command a shell would not read as one plain command with literal words.
pub fn plain_command(command: &str) -> Result<(), String> {
    let refuse = |what: &str| {
        Err(format!(
            "the command has {what} outside quotes; only plain commands are passed on"
        ))
    };
    let mut chars = command.chars();
    let mut words = 0;
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                // Everything up to the next single quote is literal.
                if !chars.by_ref().any(|c| c == '\'') {
                    return refuse("an unclosed quote");
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        None => return refuse("an unclosed quote"),
                        Some('"') => break,
                        // Expansions still happen inside double quotes.
                        Some('$') | Some('`') => return refuse("an expansion"),
                        Some('\\') => {
                            chars.next();
                        }
                        Some(_) => {}
                    }
                }
            }
            '\\' => {
                in_word = true;
                if chars.next().is_none() {
                    return refuse("a trailing backslash");
                }
            }
            ' ' | '\t' => {
                if in_word {
                    words += 1;
                }
                in_word = false;
            }
            ';' | '|' | '&' | '<' | '>' | '(' | ')' | '\n' | '\r' => {
                return refuse(&format!("the shell operator {c:?}"))
            }
            '$' | '`' => return refuse("an expansion"),
            '*' | '?' | '[' | '{' | '~' | '#' => {
                return refuse(&format!("the shell pattern character {c:?}"))
            }
            c if c.is_control() => return refuse("a control character"),
            _ => in_word = true,
        }
    }
    if in_word {
        words += 1;
    }
    if words == 0 {
        return Err("the command is empty".into());
    }
    Ok(())
}

/// Decides `command` under `rules`: plain commands only, then the first matching rule; with no
/// rules every plain command is allowed. The reason when refused.
pub fn exec_allowed(rules: &[ExecRule], command: &str) -> Result<(), String> {
    plain_command(command)?;
    if rules.is_empty() {
        return Ok(());
    }
    match rules
        .iter()
        .find(|r| glob(r.pattern.as_bytes(), command.as_bytes()))
    {
        Some(r) if r.allow => Ok(()),
        Some(r) => Err(format!("denied by exec rule 'deny:{}'", r.pattern)),
        None => Err("no exec rule allows it".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(r: &[&str]) -> Vec<ExecRule> {
        r.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn git_commands_against_rules() {
        let r = rules(&[
            "deny:git-receive-pack *",
            "allow:git-upload-pack 'org/*.git'",
            "allow:git-upload-pack '/org/*.git'",
        ]);
        assert_eq!(exec_allowed(&r, "git-upload-pack 'org/repo.git'"), Ok(()));
        assert_eq!(exec_allowed(&r, "git-upload-pack '/org/repo.git'"), Ok(()));
        assert!(exec_allowed(&r, "git-upload-pack 'other/repo.git'")
            .unwrap_err()
            .contains("no exec rule"));
        assert!(exec_allowed(&r, "git-receive-pack 'org/repo.git'")
            .unwrap_err()
            .contains("deny:"));
        // No rules: any plain command.
        assert_eq!(exec_allowed(&[], "ls -la /tmp"), Ok(()));
    }

    #[test]
    fn shell_tricks_are_refused_whatever_the_rules() {
        let r = rules(&["allow:*"]);
        for bad in [
            "git-upload-pack 'org/repo.git'; rm -rf ~",
            "git-upload-pack 'org/repo.git' && curl x",
            "git-upload-pack $(id)",
            "git-upload-pack \"$HOME\"",
            "git-upload-pack `id`",
            "git-upload-pack 'x' > /tmp/y",
            "git-upload-pack 'x'\nid",
            "git-upload-pack 'unclosed",
            "git-upload-pack *",
            "ls ~",
            "",
            "   ",
        ] {
            assert!(exec_allowed(&r, bad).is_err(), "{bad:?}");
        }
        // Quoted, the same characters are literal.
        for good in [
            "git-upload-pack 'a;b|c&d$e`f*g'",
            "echo \"a;b\"",
            "echo a\\;b",
        ] {
            assert_eq!(exec_allowed(&r, good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn rules_and_destinations_parse() {
        assert!("maybe:x".parse::<ExecRule>().is_err());
        assert!("allow:".parse::<ExecRule>().is_err());
        let d: Destination = "GitHub.com".parse().unwrap();
        assert_eq!(
            d,
            Destination {
                host: "github.com".into(),
                port: 22
            }
        );
        assert!(d.covers("github.com", 22));
        assert!(!d.covers("github.com", 2222));
        let d: Destination = "*.example.test:2222".parse().unwrap();
        assert!(d.covers("git.example.test", 2222));
        assert!(!d.covers("example.test", 2222));
        for bad in ["", ":22", "h:0", "h:x", "a b", "h/x"] {
            assert!(bad.parse::<Destination>().is_err(), "{bad:?}");
        }
    }
}
