//! Words as a Dockerfile writes them: split on unquoted whitespace, then expanded the way
//! BuildKit's shell lexer does it (quotes removed, the escape character honoured, variables
//! substituted). `RUN`, `CMD` and `ENTRYPOINT` are never expanded here: their shell does it.

use std::fmt;

/// Why a word could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WordError {
    /// A quote opened and never closed.
    Unterminated(char),
    /// `${` without its `}`, or a name that is not one.
    BadSubstitution(String),
    /// `${VAR:?message}` (or `?`) with the variable unset: the message.
    Required(String),
}

impl fmt::Display for WordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WordError::Unterminated(q) => write!(f, "unterminated quote {q}"),
            WordError::BadSubstitution(s) => write!(f, "bad substitution {s}"),
            WordError::Required(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for WordError {}

/// Splits `s` on whitespace outside quotes. Words stay raw: their quotes and escapes are kept
/// for [`expand`].
pub fn split(s: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                cur.push(c);
                if c == escape && q == '"' {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == q {
                    quote = None;
                }
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None => {
                in_word = true;
                cur.push(c);
                if c == escape {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == '\'' || c == '"' {
                    quote = Some(c);
                }
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// Expands one raw word: quotes removed, escapes applied, `$NAME`, `${NAME}`,
/// `${NAME:-word}`, `${NAME-word}`, `${NAME:+word}`, `${NAME+word}`, `${NAME:?msg}` and
/// `${NAME?msg}` substituted from `lookup` (`None`: unset).
pub fn expand(
    word: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, WordError> {
    let chars: Vec<char> = word.chars().collect();
    let mut lx = Lexer {
        chars: &chars,
        pos: 0,
        escape,
        lookup,
    };
    lx.word(None)
}

struct Lexer<'a> {
    chars: &'a [char],
    pos: usize,
    escape: char,
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.pos += c.is_some() as usize;
        c
    }

    /// Reads up to the end, or up to an unquoted `stop` (the `}` of a substitution's word).
    fn word(&mut self, stop: Option<char>) -> Result<String, WordError> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                return Ok(out);
            }
            self.pos += 1;
            match c {
                '\'' => loop {
                    match self.next() {
                        Some('\'') => break,
                        Some(c) => out.push(c),
                        None => return Err(WordError::Unterminated('\'')),
                    }
                },
                '"' => self.double_quoted(&mut out)?,
                '$' => out.push_str(&self.dollar()?),
                c if c == self.escape => match self.next() {
                    Some(n) => out.push(n),
                    // A trailing escape stands for itself.
                    None => out.push(c),
                },
                c => out.push(c),
            }
        }
        if stop.is_some() {
            return Err(WordError::BadSubstitution("missing }".into()));
        }
        Ok(out)
    }

    fn double_quoted(&mut self, out: &mut String) -> Result<(), WordError> {
        loop {
            match self.next() {
                Some('"') => return Ok(()),
                Some('$') => out.push_str(&self.dollar()?),
                Some(c) if c == self.escape => match self.next() {
                    // As in sh: only these lose their escape inside double quotes.
                    Some(n) if n == '"' || n == '$' || n == self.escape => out.push(n),
                    Some(n) => {
                        out.push(c);
                        out.push(n);
                    }
                    None => return Err(WordError::Unterminated('"')),
                },
                Some(c) => out.push(c),
                None => return Err(WordError::Unterminated('"')),
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            let ok = c == '_' || c.is_ascii_alphanumeric();
            if !ok || (name.is_empty() && c.is_ascii_digit()) {
                break;
            }
            name.push(c);
            self.pos += 1;
        }
        name
    }

    /// After a `$`: the substitution's value, or `$` itself when no name follows.
    fn dollar(&mut self) -> Result<String, WordError> {
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok((self.lookup)(&name).unwrap_or_default());
        }
        self.pos += 1;
        let name = self.name();
        if name.is_empty() {
            return Err(WordError::BadSubstitution(format!(
                "${{{}",
                self.chars[self.pos..].iter().collect::<String>()
            )));
        }
        let value = (self.lookup)(&name);
        let colon = self.peek() == Some(':');
        if colon {
            self.pos += 1;
        }
        let op = match self.next() {
            Some('}') if !colon => return Ok(value.unwrap_or_default()),
            Some(op @ ('-' | '+' | '?')) => op,
            None => return Err(WordError::BadSubstitution(format!("${{{name}: missing }}"))),
            other => {
                return Err(WordError::BadSubstitution(format!(
                    "${{{name}{}{}",
                    if colon { ":" } else { "" },
                    other.map(String::from).unwrap_or_default()
                )))
            }
        };
        let word = self.word(Some('}'))?;
        self.pos += 1; // the `}`
                       // With the colon, an empty value counts as unset.
        let set = match &value {
            Some(v) => !(colon && v.is_empty()),
            None => false,
        };
        Ok(match op {
            '-' if set => value.unwrap_or_default(),
            '-' => word,
            '+' if set => word,
            '+' => String::new(),
            _ if set => value.unwrap_or_default(),
            _ => {
                let msg = if word.is_empty() {
                    format!("{name}: parameter not set")
                } else {
                    format!("{name}: {word}")
                };
                return Err(WordError::Required(msg));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "E" => Some(String::new()),
            "SP" => Some("a b".into()),
            _ => None,
        }
    }

    fn x(w: &str) -> String {
        expand(w, '\\', &env).unwrap()
    }

    #[test]
    fn split_keeps_quoted_whitespace_and_raw_text() {
        assert_eq!(
            split(r#"a "b c" 'd e'f g\ h  "#, '\\'),
            [r#"a"#, r#""b c""#, "'d e'f", r"g\ h"]
        );
        assert_eq!(split("a=\"x \\\" y\" b", '\\'), ["a=\"x \\\" y\"", "b"]);
        assert_eq!(split("c:\\dir `  x", '`'), ["c:\\dir", "` ", "x"]);
        assert!(split("   ", '\\').is_empty());
    }

    #[test]
    fn expansion_follows_the_shell() {
        assert_eq!(x("$A"), "alpha");
        assert_eq!(x("${A}x"), "alphax");
        assert_eq!(x("$Ax"), "");
        assert_eq!(x("'$A'"), "$A");
        assert_eq!(x("\"$A b\""), "alpha b");
        assert_eq!(x("\"a\\\"b\\n\""), "a\"b\\n");
        assert_eq!(x("\\$A"), "$A");
        assert_eq!(x("a\\ b"), "a b");
        assert_eq!(x("$"), "$");
        assert_eq!(x("$1"), "$1");
        assert_eq!(x("100%"), "100%");
        assert_eq!(x("${NO:-dflt}"), "dflt");
        assert_eq!(x("${E:-dflt}"), "dflt");
        assert_eq!(x("${E-dflt}"), "");
        assert_eq!(x("${A:+set}"), "set");
        assert_eq!(x("${NO:+set}"), "");
        assert_eq!(x("${NO:-${A}-x}"), "alpha-x");
        assert_eq!(x("${NO:-\"a b\"}"), "a b");
        assert_eq!(x("$SP"), "a b");
    }

    #[test]
    fn expansion_errors_say_what() {
        let e = |w: &str| expand(w, '\\', &env).unwrap_err().to_string();
        assert_eq!(e("'abc"), "unterminated quote '");
        assert_eq!(e("\"abc"), "unterminated quote \"");
        assert!(e("${A").contains("missing }"));
        assert!(e("${}").contains("bad substitution"));
        assert!(e("${A%x}").contains("bad substitution"));
        assert_eq!(e("${NO:?give NO}"), "NO: give NO");
        assert_eq!(e("${NO?}"), "NO: parameter not set");
    }

    #[test]
    fn backtick_escape() {
        assert_eq!(expand("c:\\dir`$x", '`', &env).unwrap(), "c:\\dir$x");
    }
}
