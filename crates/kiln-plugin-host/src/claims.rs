//! Claim patterns: which files a plugin wants, as globs over
//! repository-relative, `/`-separated paths.
//!
//! The contract's glob dialect is small on purpose: `*` matches any run of
//! characters within one path segment, `?` one character, and a segment that
//! is exactly `**` matches any number of segments (zero included). Everything
//! else is literal, so a claim means the same to every plugin author.

/// A parsed claim pattern.
#[derive(Clone, Debug)]
pub(crate) struct Claim {
    segments: Vec<Segment>,
}

#[derive(Clone, Debug)]
enum Segment {
    /// `**`: any number of whole segments.
    AnyDepth,
    /// A pattern for one segment.
    One(Vec<char>),
}

impl Claim {
    /// Parses `pattern`, or says why it is not a valid claim.
    pub(crate) fn parse(pattern: &str) -> Result<Claim, String> {
        if pattern.is_empty() || pattern.starts_with('/') {
            return Err(format!("claim `{pattern}` must be a relative path pattern"));
        }
        let mut segments = Vec::new();
        for segment in pattern.split('/') {
            match segment {
                "" | "." | ".." => {
                    return Err(format!("claim `{pattern}` has an empty, `.` or `..` segment"));
                }
                "**" => segments.push(Segment::AnyDepth),
                _ => segments.push(Segment::One(segment.chars().collect())),
            }
        }
        Ok(Claim { segments })
    }

    /// Whether `path` (repository-relative, `/`-separated) matches.
    pub(crate) fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        match_segments(&self.segments, &parts)
    }
}

fn match_segments(pattern: &[Segment], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((Segment::AnyDepth, rest)) => (0..=path.len()).any(|skip| match_segments(rest, &path[skip..])),
        Some((Segment::One(glob), rest)) => match path.split_first() {
            Some((first, others)) => {
                let name: Vec<char> = first.chars().collect();
                match_segment(glob, &name) && match_segments(rest, others)
            }
            None => false,
        },
    }
}

/// Wildcard match of one segment: `*` (any run) and `?` (one character),
/// with the usual backtracking to the last `*`.
fn match_segment(glob: &[char], name: &[char]) -> bool {
    let (mut g, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match glob.get(g) {
            Some('*') => {
                star = Some((g, n));
                g += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                g += 1;
                n += 1;
            }
            _ => match star {
                Some((star_g, star_n)) => {
                    g = star_g + 1;
                    n = star_n + 1;
                    star = Some((star_g, star_n + 1));
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        Claim::parse(pattern).unwrap().matches(path)
    }

    #[test]
    fn double_star_spans_any_number_of_segments() {
        assert!(m("tests/**/*.py", "tests/test_a.py"));
        assert!(m("tests/**/*.py", "tests/a/b/test_c.py"));
        assert!(!m("tests/**/*.py", "tests/data.txt"));
        assert!(!m("tests/**/*.py", "src/tests/test_a.py"));
        assert!(m("**", "a/b"));
        assert!(m("**/x", "x"));
    }

    #[test]
    fn single_star_stays_in_its_segment() {
        assert!(m("tests/test*.py", "tests/test_a.py"));
        assert!(m("tests/test*.py", "tests/test.py"));
        assert!(!m("tests/*.py", "tests/a/b.py"));
        assert!(m("t?sts/*a*b*", "tests/xaxxbx"));
        assert!(!m("tests/*a*b", "tests/xaxxbx"));
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in ["", "/abs", "a//b", "a/../b"] {
            assert!(Claim::parse(bad).is_err(), "{bad}");
        }
    }
}
