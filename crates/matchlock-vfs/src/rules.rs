//! VFS interception rules: operations blocked by kind and guest path glob (Matchlock's
//! `vfs.interception.rules` with `action: block`; a blocked operation fails with `EPERM`).

use crate::op::VfsOp;

pub use matchlock_api::config::{op_kind, VfsBlockRule as BlockRule, OP_KINDS};

/// Whether `rule` blocks `kind` on `path`.
pub fn blocks(rule: &BlockRule, kind: &str, path: &str) -> bool {
    (rule.ops.is_empty() || rule.ops.iter().any(|o| o == kind))
        && (rule.path.is_empty() || glob(rule.path.as_bytes(), path.as_bytes()))
}

/// The kinds of an operation (a setattr can be several at once).
pub fn kinds(op: &VfsOp) -> Vec<&'static str> {
    match op {
        VfsOp::Lookup { .. } | VfsOp::Getattr { .. } | VfsOp::Statfs => vec!["stat"],
        VfsOp::Forget { .. } => vec![],
        VfsOp::Setattr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            ..
        } => {
            let mut k = Vec::new();
            if size.is_some() {
                k.push("truncate");
            }
            // Owners and times have no kind of their own in Matchlock's list; they change
            // attributes like chmod does.
            if mode.is_some()
                || uid.is_some()
                || gid.is_some()
                || atime.is_some()
                || mtime.is_some()
            {
                k.push("chmod");
            }
            k
        }
        VfsOp::Readlink { .. } => vec!["readlink"],
        VfsOp::Mkdir { .. } => vec!["mkdir"],
        VfsOp::Unlink { .. } | VfsOp::Rmdir { .. } => vec!["remove"],
        VfsOp::Symlink { .. } => vec!["symlink"],
        VfsOp::Rename { .. } => vec!["rename"],
        VfsOp::Link { .. } | VfsOp::Create { .. } | VfsOp::Mknod { .. } => vec!["create"],
        VfsOp::Open { .. } => vec!["open"],
        // Finding holes and data reads the file's layout.
        VfsOp::Read { .. } | VfsOp::Lseek { .. } => vec!["read"],
        VfsOp::Write { .. } | VfsOp::Fallocate { .. } => vec!["write"],
        VfsOp::Release { .. } => vec!["close"],
        VfsOp::Fsync { .. } | VfsOp::Syncfs => vec!["sync"],
        VfsOp::Opendir { .. } | VfsOp::Readdir { .. } | VfsOp::ReaddirPlus { .. } => {
            vec!["readdir"]
        }
    }
}

/// Go `filepath.Match` semantics: `*` is any run of non-`/` bytes, `?` one non-`/` byte,
/// `[abc]`, `[a-z]`, `[^...]` a class, `\` escapes. A malformed class matches nothing.
pub fn glob(pat: &[u8], s: &[u8]) -> bool {
    match pat.first() {
        None => s.is_empty(),
        Some(b'*') => {
            let rest = &pat[1..];
            // Try every split point up to the next '/'.
            let mut i = 0;
            loop {
                if glob(rest, &s[i..]) {
                    return true;
                }
                if i == s.len() || s[i] == b'/' {
                    return false;
                }
                i += 1;
            }
        }
        Some(b'?') => !s.is_empty() && s[0] != b'/' && glob(&pat[1..], &s[1..]),
        Some(b'[') => {
            let Some((&c, rest)) = s.split_first() else {
                return false;
            };
            match class(&pat[1..], c) {
                Some((true, after)) if c != b'/' => glob(after, rest),
                _ => false,
            }
        }
        Some(b'\\') if pat.len() > 1 => s.first() == Some(&pat[1]) && glob(&pat[2..], &s[1..]),
        Some(&p) => s.first() == Some(&p) && glob(&pat[1..], &s[1..]),
    }
}

/// Matches `c` against a class body (after `[`); returns the verdict and the pattern after `]`.
fn class(mut pat: &[u8], c: u8) -> Option<(bool, &[u8])> {
    let negate = matches!(pat.first(), Some(b'^') | Some(b'!'));
    if negate {
        pat = &pat[1..];
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let (&lo, rest) = pat.split_first()?;
        if lo == b']' && !first {
            return Some((hit != negate, rest));
        }
        first = false;
        let (lo, rest) = if lo == b'\\' {
            let (&e, r) = rest.split_first()?;
            (e, r)
        } else {
            (lo, rest)
        };
        if rest.first() == Some(&b'-') && rest.get(1).is_some_and(|&h| h != b']') {
            let hi = rest[1];
            hit |= lo <= c && c <= hi;
            pat = &rest[2..];
        } else {
            hit |= lo == c;
            pat = rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_follow_go_filepath_match() {
        assert!(glob(b"/workspace/*", b"/workspace/a.txt"));
        assert!(!glob(b"/workspace/*", b"/workspace/d/a.txt"));
        assert!(glob(b"/workspace/*/a.txt", b"/workspace/d/a.txt"));
        assert!(glob(b"*.env", b".env"));
        assert!(glob(b"/w/?.txt", b"/w/a.txt"));
        assert!(!glob(b"/w/?.txt", b"/w/ab.txt"));
        assert!(glob(b"/w/[a-c]x", b"/w/bx"));
        assert!(!glob(b"/w/[^a-c]x", b"/w/bx"));
        assert!(glob(b"/w/\\*", b"/w/*"));
        assert!(!glob(b"/w/[a", b"/w/a"));
        assert!(glob(b"", b""));
    }

    #[test]
    fn aliases_and_kinds() {
        assert_eq!(op_kind("read_dir"), Some("readdir"));
        assert_eq!(op_kind("removeall"), Some("remove"));
        assert_eq!(op_kind("explode"), None);
        let r = BlockRule {
            ops: vec!["write".into()],
            path: "/workspace/*.lock".into(),
        };
        assert!(blocks(&r, "write", "/workspace/x.lock"));
        assert!(!blocks(&r, "read", "/workspace/x.lock"));
        assert!(!blocks(&r, "write", "/workspace/x.txt"));
    }
}
