//! Image reference normalisation with Docker's rules (`busybox` means `docker.io/library/busybox:latest`).

use crate::ImageError;

const DEFAULT_DOMAIN: &str = "docker.io";
const MAX_NAME_LEN: usize = 255;

/// Normalise an image reference the way Docker does.
///
/// * `busybox` => `docker.io/library/busybox:latest`
/// * `x/y:1` => `docker.io/x/y:1`
/// * `localhost:5000/a` => `localhost:5000/a:latest`
/// * `a@sha256:<64 hex>` => `docker.io/library/a@sha256:<64 hex>` (a digest reference gets no tag)
///
/// Empty references, upper-case repository names and characters Docker does not allow are rejected.
pub fn normalize_reference(name: &str) -> Result<String, ImageError> {
    let bad = |reason: &str| ImageError::InvalidReference {
        input: name.to_string(),
        reason: reason.to_string(),
    };
    let input = name.trim();
    if input.is_empty() {
        return Err(bad(
            "the reference is empty; give a name such as 'busybox' or 'alpine:3.20'",
        ));
    }
    if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it contains whitespace or control characters"));
    }

    let (name_tag, digest) = match input.split_once('@') {
        Some((n, d)) => {
            validate_digest(d).map_err(|r| bad(&r))?;
            (n, Some(d))
        }
        None => (input, None),
    };

    // The tag is whatever follows the last ':' after the last '/', so `host:5000/repo` has no tag.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (&name_tag[..at], Some(&name_tag[at + 1..]))
        }
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        validate_tag(tag).map_err(|r| bad(&r))?;
    }
    if repo.is_empty() {
        return Err(bad("the repository name is empty"));
    }

    // A first component with a '.' or ':' or equal to `localhost` names a registry (Docker's rule).
    let (domain, path) = match repo.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            validate_domain(first).map_err(|r| bad(&r))?;
            let domain = if first == "index.docker.io" {
                DEFAULT_DOMAIN
            } else {
                first
            };
            (domain.to_string(), rest.to_string())
        }
        _ => (DEFAULT_DOMAIN.to_string(), repo.to_string()),
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    for component in path.split('/') {
        validate_path_component(component).map_err(|r| bad(&r))?;
    }
    let full_name = format!("{domain}/{path}");
    if full_name.len() > MAX_NAME_LEN {
        return Err(bad("the repository name is longer than 255 characters"));
    }

    let mut out = full_name;
    match (tag, digest) {
        (Some(t), _) => {
            out.push(':');
            out.push_str(t);
        }
        (None, None) => out.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(d) = digest {
        out.push('@');
        out.push_str(d);
    }
    Ok(out)
}

/// The short form users know: `docker.io/library/busybox:latest` => `busybox:latest`.
pub(crate) fn familiar(normalized: &str) -> &str {
    if let Some(rest) = normalized.strip_prefix("docker.io/library/") {
        rest
    } else if let Some(rest) = normalized.strip_prefix("docker.io/") {
        rest
    } else {
        normalized
    }
}

fn validate_digest(d: &str) -> Result<(), String> {
    let Some(hex) = d.strip_prefix("sha256:") else {
        return Err(format!("digest \"{d}\" must be sha256:<64 hex digits>"));
    };
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "digest \"{d}\" must be sha256:<64 lower-case hex digits>"
        ));
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    // Docker: [\w][\w.-]{0,127}
    let ok_first = tag
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let ok_rest = tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if tag.is_empty() || tag.len() > 128 || !ok_first || !ok_rest {
        return Err(format!(
            "tag \"{tag}\" must be 1-128 characters of letters, digits, '_', '.', '-' and not start with '.' or '-'"
        ));
    }
    Ok(())
}

fn validate_domain(domain: &str) -> Result<(), String> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("registry port in \"{domain}\" must be a number"));
        }
    }
    let ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !ok {
        return Err(format!(
            "registry host \"{domain}\" is not a valid host name"
        ));
    }
    Ok(())
}

fn validate_path_component(c: &str) -> Result<(), String> {
    if c.is_empty() {
        return Err("the repository path has an empty component ('//' or a trailing '/')".into());
    }
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "repository name component \"{c}\" must be lower-case"
        ));
    }
    // Docker: [a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let mut ok = !bytes.is_empty() && alnum(bytes[0]);
    while ok && i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or any number of '-'; it must be followed by alnum.
        let start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => {
                ok = false;
                break;
            }
        }
        ok = i > start && i < bytes.len() && alnum(bytes[i]);
    }
    if !ok {
        return Err(format!(
            "repository name component \"{c}\" may only hold a-z, 0-9 and single '.', '_', '__' or '-' runs between them"
        ));
    }
    Ok(())
}
