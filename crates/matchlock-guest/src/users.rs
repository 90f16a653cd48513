//! Resolving an exec's `user` spec against the guest's `/etc/passwd` and `/etc/group`.
//!
//! The agent is a static glibc binary, and glibc's NSS (`getpwnam` and friends) does not work in a
//! static binary, so the two files are parsed here. Only the classic colon-separated formats are
//! understood, which is what container images ship.

use std::fmt;

/// Directory the files are read from (the root of the guest after Setup).
pub const PASSWD: &str = "/etc/passwd";
pub const GROUP: &str = "/etc/group";
/// A bigger account database than this is not a plausible image; refuse rather than allocate.
const MAX_DB_BYTES: u64 = 16 * 1024 * 1024;

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// Numeric group id.
    pub gid: u32,
    /// Names of the supplementary members.
    pub members: Vec<String>,
}

/// The credentials a process is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the primary group first).
    pub groups: Vec<u32>,
    /// Home directory, used for `HOME` when the request's environment has none.
    pub home: String,
}

/// Why a user spec could not be resolved; the `Display` text goes to the user as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserError {
    /// A user name that is not in `/etc/passwd`.
    UnknownUser(String),
    /// A group name that is not in `/etc/group`.
    UnknownGroup(String),
    /// An empty or otherwise unusable spec.
    Invalid(String),
    /// `/etc/passwd` or `/etc/group` could not be read.
    Read(String),
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserError::UnknownUser(u) => write!(f, "unknown user {u} (not in /etc/passwd)"),
            UserError::UnknownGroup(g) => write!(f, "unknown group {g} (not in /etc/group)"),
            UserError::Invalid(s) => write!(f, "invalid user spec {s:?}"),
            UserError::Read(e) => write!(f, "{e}"),
        }
    }
}

/// The colon-separated fields of each line with at least `min_fields`, skipping blank and
/// comment lines (the shared shape of `/etc/passwd` and `/etc/group`).
fn records(text: &str, min_fields: usize) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(':').collect::<Vec<&str>>())
        .filter(move |f| f.len() >= min_fields)
}

/// Parses `/etc/passwd` content. Malformed lines are skipped, as glibc does.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    records(text, 7)
        .filter_map(|f| {
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

/// Parses `/etc/group` content. Malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    records(text, 4)
        .filter_map(|f| {
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `spec` (`uid`, `uid:gid`, `name`, `name:group`, or `None` for root) against parsed
/// databases.
///
/// Numeric ids need not exist in the files (as in Docker): an unknown uid gets gid 0 and home `/`.
/// Supplementary groups are the primary gid plus every group that lists the user's name.
pub fn resolve(
    spec: Option<&str>,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<Credentials, UserError> {
    let spec = spec.unwrap_or("0");
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(UserError::Invalid(spec.to_string()));
    }

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|p| p.uid == uid).cloned().ok_or(uid),
        Err(_) => Ok(passwd
            .iter()
            .find(|p| p.name == user_part)
            .cloned()
            .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?),
    };
    let (uid, mut gid, name, home) = match entry {
        Ok(p) => (p.uid, p.gid, Some(p.name), p.home),
        // A numeric uid without a passwd line: root's defaults, like Docker.
        Err(uid) => (uid, 0, None, "/".to_string()),
    };

    if let Some(g) = group_part {
        gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .find(|e| e.name == g)
                    .ok_or_else(|| UserError::UnknownGroup(g.to_string()))?
                    .gid
            }
        };
    }

    let mut supplementary = vec![gid];
    if let Some(name) = &name {
        for g in groups {
            if g.members.iter().any(|m| m == name) && !supplementary.contains(&g.gid) {
                supplementary.push(g.gid);
            }
        }
    }
    Ok(Credentials {
        uid,
        gid,
        groups: supplementary,
        home: if home.is_empty() { "/".into() } else { home },
    })
}

/// Reads one database file; a missing file counts as empty (minimal images have none).
pub fn read_db(path: &str) -> Result<String, UserError> {
    use std::io::Read;
    match std::fs::File::open(path) {
        Ok(f) => {
            let mut text = String::new();
            f.take(MAX_DB_BYTES)
                .read_to_string(&mut text)
                .map_err(|e| UserError::Read(format!("reading {path}: {e}")))?;
            Ok(text)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(UserError::Read(format!("reading {path}: {e}"))),
    }
}

/// Resolves `spec` against the guest's current `/etc/passwd` and `/etc/group`.
pub fn lookup(spec: Option<&str>) -> Result<Credentials, UserError> {
    let passwd = parse_passwd(&read_db(PASSWD)?);
    let groups = parse_group(&read_db(GROUP)?);
    resolve(spec, &passwd, &groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_FIXTURE: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken line without fields
bad:x:notanumber:1::/:/bin/sh
app:x:1000:1000:App User,,,:/home/app:/bin/sh
nohome:x:1001:1001:::/bin/sh
";
    const GROUP_FIXTURE: &str = "\
root:x:0:
daemon:x:1:
wheel:x:10:app, root
docker:x:999:app
app:x:1000:
staff:x:50:
garbage
";

    fn db() -> (Vec<PasswdEntry>, Vec<GroupEntry>) {
        (parse_passwd(PASSWD_FIXTURE), parse_group(GROUP_FIXTURE))
    }

    #[test]
    fn parses_and_skips_malformed_lines() {
        let (p, g) = db();
        assert_eq!(
            p.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["root", "daemon", "app", "nohome"]
        );
        assert_eq!(p[2].home, "/home/app");
        assert_eq!(g.len(), 6);
        assert_eq!(g[2].members, ["app", "root"]);
    }

    #[test]
    fn default_is_root_with_memberships() {
        let (p, g) = db();
        let c = resolve(None, &p, &g).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (0, 0, "/root"));
        assert_eq!(c.groups, [0, 10]);
    }

    #[test]
    fn name_resolves_primary_and_supplementary_groups() {
        let (p, g) = db();
        let c = resolve(Some("app"), &p, &g).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 1000));
        assert_eq!(c.groups, [1000, 10, 999]);
        assert_eq!(c.home, "/home/app");
    }

    #[test]
    fn numeric_forms() {
        let (p, g) = db();
        let c = resolve(Some("1000"), &p, &g).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (1000, 1000, "/home/app"));
        let c = resolve(Some("1000:50"), &p, &g).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 50));
        assert_eq!(c.groups, [50, 10, 999]);
        // Not in passwd: allowed, with root's group and `/` as home.
        let c = resolve(Some("4242"), &p, &g).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (4242, 0, "/"));
        assert_eq!(c.groups, [0]);
        let c = resolve(Some("4242:4343"), &p, &g).unwrap();
        assert_eq!((c.uid, c.gid), (4242, 4343));
    }

    #[test]
    fn name_and_group_name() {
        let (p, g) = db();
        let c = resolve(Some("app:staff"), &p, &g).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 50));
        let c = resolve(Some("1000:docker"), &p, &g).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 999));
    }

    #[test]
    fn empty_home_becomes_root_dir() {
        let (p, g) = db();
        assert_eq!(resolve(Some("nohome"), &p, &g).unwrap().home, "/");
    }

    #[test]
    fn errors_are_explicit() {
        let (p, g) = db();
        assert_eq!(
            resolve(Some("nobody"), &p, &g).unwrap_err().to_string(),
            "unknown user nobody (not in /etc/passwd)"
        );
        assert_eq!(
            resolve(Some("app:nogroup"), &p, &g)
                .unwrap_err()
                .to_string(),
            "unknown group nogroup (not in /etc/group)"
        );
        assert!(matches!(
            resolve(Some(""), &p, &g),
            Err(UserError::Invalid(_))
        ));
        assert!(matches!(
            resolve(Some("app:"), &p, &g),
            Err(UserError::Invalid(_))
        ));
        assert!(matches!(
            resolve(Some(":1"), &p, &g),
            Err(UserError::Invalid(_))
        ));
    }

    #[test]
    fn empty_databases() {
        let c = resolve(None, &[], &[]).unwrap();
        assert_eq!((c.uid, c.gid, c.home.as_str()), (0, 0, "/"));
        assert!(resolve(Some("root"), &[], &[]).is_err());
    }
}
