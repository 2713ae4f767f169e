//! Anchored glob patterns: `*` matches any run of characters, `?` exactly one,
//! everything else (regex metacharacters included) only itself. Used for
//! `list_variables(sid, "temp_*")` and for session patterns in access rules.
//!
//! Matching is iterative with one backtrack point (the classic wildcard
//! algorithm), so it is linear-ish and cannot overflow a stack.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    source: Box<str>,
    chars: Box<[char]>,
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
            chars: pattern.chars().collect(),
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
            Shape::General => wildcard(&self.chars, text),
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

/// The classic wildcard algorithm with one backtrack point, walking `text`
/// by byte offset so nothing is allocated.
fn wildcard(p: &[char], text: &str) -> bool {
    let next_char = |at: usize| text.get(at..).and_then(|rest| rest.chars().next());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while let Some(c) = next_char(ti) {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == c)) {
            pi += 1;
            ti += c.len_utf8();
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            // The star swallows one more character of the text.
            let st = st + next_char(st).map_or(1, char::len_utf8);
            pi = sp + 1;
            ti = st;
            star = Some((sp, st));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
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
        }
    }
}
