//! Anchored glob patterns: `*` matches any run of characters, `?` exactly one,
//! everything else (regex metacharacters included) only itself. Used for
//! `list_variables(sid, "temp_*")` and for session patterns in access rules.
//!
//! Matching is iterative with one backtrack point (the classic wildcard
//! algorithm), so it is linear-ish and cannot overflow a stack.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    source: Box<str>,
    shape: Shape,
}

/// Common pattern shapes, matched without the general algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// No wildcard at all: compare strings directly.
    Literal,
    /// `text*` (one or more trailing stars, nothing else special): a prefix
    /// of this many bytes.
    Prefix(usize),
    /// `*text` (leading stars only): a suffix starting at this byte.
    Suffix(usize),
    General,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob {
            source: pattern.into(),
            shape: Shape::of(pattern),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True when the pattern has no wildcard, so it matches only itself.
    pub fn is_literal(&self) -> bool {
        self.shape == Shape::Literal
    }

    /// Does the whole of `text` match? Allocation-free.
    pub fn matches(&self, text: &str) -> bool {
        match self.shape {
            Shape::Literal => &*self.source == text,
            Shape::Prefix(n) => text.as_bytes().starts_with(&self.source.as_bytes()[..n]),
            Shape::Suffix(n) => text.as_bytes().ends_with(&self.source.as_bytes()[n..]),
            Shape::General => wildcard(&self.source, text),
        }
    }
}

impl Shape {
    fn of(pattern: &str) -> Shape {
        let special = |c: char| c == '*' || c == '?';
        if !pattern.contains(special) {
            return Shape::Literal;
        }
        let body = pattern.trim_end_matches('*');
        if !body.contains(special) {
            return Shape::Prefix(body.len());
        }
        let tail = pattern.trim_start_matches('*');
        if !tail.contains(special) {
            return Shape::Suffix(pattern.len() - tail.len());
        }
        Shape::General
    }
}

/// Matches `text` against a pattern not compiled beforehand (for rules
/// that arrive as data); the same semantics as [`Glob::matches`].
pub fn matches(pattern: &str, text: &str) -> bool {
    // Most patterns that fail, fail on their first (literal) byte.
    if let Some(&first) = pattern.as_bytes().first() {
        if first != b'*' && first != b'?' && text.as_bytes().first() != Some(&first) {
            return false;
        }
    }
    if pattern.contains(['*', '?']) {
        wildcard(pattern, text)
    } else {
        pattern == text
    }
}

/// The classic wildcard algorithm with one backtrack point, walking pattern
/// and text by byte offset so nothing is allocated.
fn wildcard(pattern: &str, text: &str) -> bool {
    fn at(s: &str, i: usize) -> Option<char> {
        s.get(i..).and_then(|rest| rest.chars().next())
    }
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while let Some(c) = at(text, ti) {
        match at(pattern, pi) {
            // A trailing star takes the rest of the text.
            Some('*') if pi + 1 == pattern.len() => return true,
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(p) if p == '?' || p == c => {
                pi += p.len_utf8();
                ti += c.len_utf8();
            }
            _ => match star {
                Some((sp, st)) => {
                    // The star swallows one more character of the text.
                    let st = st + at(text, st).map_or(1, char::len_utf8);
                    pi = sp + 1;
                    ti = st;
                    star = Some((sp, st));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(pi..)
        .is_some_and(|rest| rest.chars().all(|c| c == '*'))
}

#[cfg(test)]
mod tests {
    use super::Glob;
    use proptest::prelude::*;

    #[test]
    fn anchored() {
        let g = Glob::new("admin_*");
        assert!(g.matches("admin_1"));
        assert!(g.matches("admin_"));
        assert!(!g.matches("not_admin_1"));
        assert!(Glob::new("a?c").matches("abc"));
        assert!(!Glob::new("a?c").matches("ac"));
        assert!(Glob::new("a.b*").matches("a.bc"));
        assert!(!Glob::new("a.b*").matches("axbc"));
        assert!(Glob::new("x+y").matches("x+y"));
        assert!(!Glob::new("x+y").matches("xxy"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("*_admin").matches("x_admin"));
        assert!(!Glob::new("*_admin").matches("x_admins"));
        assert!(Glob::new("é?").matches("éé"));
        assert!(!Glob::new("é?").matches("é"));
        assert!(Glob::new("a*b*c").matches("aXbYc"));
        assert!(!Glob::new("a*b*c").matches("aXbY"));
    }

    /// Reference: a plain recursive matcher, fine for short test inputs.
    fn reference(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| reference(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && reference(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && reference(rest, &t[1..]),
        }
    }

    proptest! {
        #[test]
        fn agrees_with_reference(p in "[ab*?.é]{0,8}", t in "[ab.é]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(Glob::new(&p).matches(&t), reference(&pc, &tc));
            prop_assert_eq!(super::matches(&p, &t), reference(&pc, &tc));
        }
    }
}
