//! Anchored glob patterns: `*` matches any run of characters, `?` exactly one,
//! everything else (regex metacharacters included) only itself. Used for
//! `list_variables(sid, "temp_*")` and for session patterns in access rules.
//!
//! Matching is iterative with one backtrack point (the classic wildcard
//! algorithm), so it is linear-ish and cannot overflow a stack.
//!
//! Why hand-written (`cargo bench -p dspex_core --bench compare`, issue 12,
//! one run on the shared 2-core machine): of the crates, `wildmatch` has
//! these semantics as they are (it agreed on all 20 027 pairs of the bench's
//! corpus; `glob` did once brackets were escaped; `globset` did not, its `?`
//! takes one byte of `é`). Matching costs about the same as `wildmatch` on
//! a general pattern (64 against 53 ns a text, within the run's noise) and
//! less on the common shapes, which skip the algorithm (literal 8 against
//! 34 ns, `prefix*` 31 against 43, `*suffix` 26 against 119); compiling
//! costs 70-190 ns against 150-480; and [`matches()`] takes a pattern it has
//! not compiled without allocating, which the NIF needs to evaluate access
//! rules where they lie (`wildmatch` builds a `Vec<char>` per pattern).

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
        self.shape.matches(&self.source, text)
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

    /// Does the whole of `text` match `pattern`, of this shape?
    fn matches(self, pattern: &str, text: &str) -> bool {
        match self {
            Shape::Literal => pattern == text,
            Shape::Prefix(n) => text.as_bytes().starts_with(&pattern.as_bytes()[..n]),
            Shape::Suffix(n) => text.as_bytes().ends_with(&pattern.as_bytes()[n..]),
            Shape::General => wildcard(pattern, text),
        }
    }
}

/// Matches `text` against a pattern not compiled beforehand (for rules
/// that arrive as data); the same semantics as [`Glob::matches`], and the
/// same shortcuts for the common shapes.
pub fn matches(pattern: &str, text: &str) -> bool {
    // Most patterns that fail, fail on their first (literal) byte.
    if let Some(&first) = pattern.as_bytes().first() {
        if first != b'*' && first != b'?' && text.as_bytes().first() != Some(&first) {
            return false;
        }
    }
    Shape::of(pattern).matches(pattern, text)
}

/// The UTF-8 length of the character whose first byte is `lead`.
fn char_len(lead: u8) -> usize {
    match lead {
        0..=0x7f => 1,
        0xf0.. => 4,
        0xe0.. => 3,
        _ => 2,
    }
}

/// The classic wildcard algorithm with one backtrack point, over bytes so
/// nothing is decoded or allocated. `*` and `?` are ASCII, so they never sit
/// inside a multi-byte character of the pattern; the text position only
/// moves by whole characters at a wildcard (`?` takes one character, a star
/// one more character), and a literal character is compared byte by byte,
/// so a match is always made of whole characters.
fn wildcard(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while let Some(&c) = t.get(ti) {
        match p.get(pi) {
            // A trailing star takes the rest of the text.
            Some(b'*') if pi + 1 == p.len() => return true,
            Some(b'*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(b'?') => {
                pi += 1;
                ti += char_len(c);
            }
            Some(&b) if b == c => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    // The star swallows one more character of the text.
                    let st = st + char_len(t[st]);
                    pi = sp + 1;
                    ti = st;
                    star = Some((sp, st));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
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
        fn agrees_with_reference(p in "[ab*?.é€😀]{0,8}", t in "[ab.é€😀]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(Glob::new(&p).matches(&t), reference(&pc, &tc));
            prop_assert_eq!(super::matches(&p, &t), reference(&pc, &tc));
        }
    }
}
