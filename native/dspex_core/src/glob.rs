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
    /// No wildcard at all: compare strings directly.
    literal: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob {
            source: pattern.into(),
            chars: pattern.chars().collect(),
            literal: !pattern.contains(['*', '?']),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, text: &str) -> bool {
        if self.literal {
            return &*self.source == text;
        }
        let p = &self.chars;
        let t: Vec<char> = text.chars().collect();
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
                pi += 1;
                ti += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, ti));
                pi += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
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
        fn agrees_with_reference(p in "[ab*?.]{0,8}", t in "[ab.]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            prop_assert_eq!(Glob::new(&p).matches(&t), reference(&pc, &tc));
        }
    }
}
