//! Tables the way Matchlock prints them (Go's `tabwriter` with padding 2): each column as wide
//! as its widest cell plus two spaces, the last one unpadded, the header always printed. Scripts
//! written for Matchlock split these lines on whitespace.

/// Renders `header` and `rows` as aligned lines, each ending in a newline.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for r in std::iter::once(&header).chain(rows) {
        let last = r.len().saturating_sub(1);
        for (i, c) in r.iter().enumerate() {
            out.push_str(c);
            if i < last {
                let pad = widths[i] + 2 - c.chars().count();
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    }
    out
}

/// Prints [`render`] to standard output.
pub fn print(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render(header, rows));
}

/// `bytes` as Matchlock shows sizes: `%.1f MB` of MiB.
pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / (1024.0 * 1024.0))
}

/// A UTC time, seconds since the epoch, as `YYYY-MM-DD HH:MM` (with seconds when asked).
pub fn utc(secs: u64, with_seconds: bool) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    if with_seconds {
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}")
    } else {
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}")
    }
}

/// A UTC time, seconds since the epoch, as RFC 3339 (`2026-03-14T22:45:55Z`).
pub fn rfc3339(secs: u64) -> String {
    utc(secs, true).replacen(' ', "T", 1) + "Z"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_like_tabwriter() {
        let t = render(
            &["ID", "STATUS", "PID"],
            &[vec!["vm-1".into(), "running".into(), "42".into()]],
        );
        assert_eq!(t, "ID    STATUS   PID\nvm-1  running  42\n");
        assert_eq!(render(&["NAME", "SIZE"], &[]), "NAME  SIZE\n");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0, false), "1970-01-01 00:00");
        assert_eq!(utc(1_773_528_355, true), "2026-03-14 22:45:55");
        assert_eq!(utc(951_782_400, false), "2000-02-29 00:00");
        assert_eq!(rfc3339(1_773_528_355), "2026-03-14T22:45:55Z");
    }
}
