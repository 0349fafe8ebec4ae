//! Text from outside the process (file names, repository names, test ids,
//! anything a peer sent) made safe to put in a log line: [`Escaped`] shows
//! control characters as escapes, so a value can never end a log line early
//! and forge the next one, or move the terminal's cursor. [`for_terminal`]
//! is the same for a line of test output printed for people: colour and
//! other ANSI sequences are removed rather than shown as escapes.

use std::fmt;

/// Displays a string with every control character (newline, carriage
/// return, escape, …) and every bidirectional-override character written
/// as a Rust-style escape (`\n`, `\u{1b}`, `\u{202e}`); everything else is
/// shown as is. Use it for every outside value in a log line:
/// `info!(file = %Escaped(&name), "…")`.
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        // Write runs of harmless characters in one go; escape the others.
        while let Some((at, c)) = rest.char_indices().find(|&(_, c)| needs_escape(c)) {
            f.write_str(&rest[..at])?;
            write!(f, "{}", c.escape_default())?;
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// Characters that change how a log line reads beyond their own glyph.
fn needs_escape(c: char) -> bool {
    c.is_control()
        // Bidirectional embeddings, overrides and isolates reorder what follows them.
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        // Line and paragraph separators end a line in some viewers.
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Shorthand for `Escaped(s).to_string()`, for values kept in error messages.
pub fn escaped(s: &str) -> String {
    Escaped(s).to_string()
}

/// One line of outside text (a test's message, say) made safe to print on a
/// terminal: ANSI escape sequences (colours, cursor moves, window titles,
/// hyperlinks) are removed whole, so what a test printed in colour reads as
/// its plain text; every other control character but a tab is escaped as in
/// [`Escaped`], so nothing left can act on the terminal.
pub fn for_terminal(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.peek() {
                // CSI: parameters and intermediates, up to one final byte in @..~.
                Some('[') => {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC (title, hyperlink), DCS, SOS, PM, APC: a string up to BEL or ST (ESC \\).
                Some(']' | 'P' | 'X' | '^' | '_') => {
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) || c == '\u{9c}' {
                            break;
                        }
                    }
                }
                // Any other escape: the escape and the one character it applies to.
                Some(_) => {
                    chars.next();
                }
                None => {}
            },
            // The 8-bit CSI.
            '\u{9b}' => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            '\t' => out.push('\t'),
            c if needs_escape(c) => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_escapes_and_nothing_else_changes() {
        assert_eq!(escaped("tests/test_a.py"), "tests/test_a.py");
        assert_eq!(escaped("häßlich ✓ 名前"), "häßlich ✓ 名前");
        assert_eq!(escaped("a.py\n2026-12-01T00:00:00Z  INFO forged"), "a.py\\n2026-12-01T00:00:00Z  INFO forged");
        assert_eq!(escaped("\r\t\x1b[31m\0"), "\\r\\t\\u{1b}[31m\\u{0}");
        assert_eq!(escaped("x\u{202e}y\u{2028}"), "x\\u{202e}y\\u{2028}");
        assert_eq!(escaped(""), "");
    }

    #[test]
    fn terminal_text_loses_ansi_sequences_and_keeps_no_control_character() {
        assert_eq!(for_terminal("\x1b[31mFAIL\x1b[0m: 1 != 2"), "FAIL: 1 != 2");
        assert_eq!(for_terminal("\x1b[38;5;196mred\x1b[m\tok"), "red\tok");
        assert_eq!(for_terminal("a\x1b]0;pwned title\x07b"), "ab");
        assert_eq!(for_terminal("a\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\b"), "alinkb");
        assert_eq!(for_terminal("x\x1bcy\u{9b}2Jz"), "xyz");
        assert_eq!(for_terminal("over\rwrite\x08\x07"), "over\\rwrite\\u{8}\\u{7}");
        assert_eq!(for_terminal("unterminated \x1b["), "unterminated ");
        assert_eq!(for_terminal("häßlich ✓ <script>"), "häßlich ✓ <script>");
        for c in (0..=0x3000u32).filter_map(char::from_u32) {
            let shown = for_terminal(&format!("a{c}b{c}[1m{c}]c"));
            assert!(!shown.contains(|c: char| c != '\t' && needs_escape(c)), "{c:?} -> {shown:?}");
        }
    }

    #[test]
    fn no_escaped_value_contains_a_line_break() {
        for c in (0..=0x3000u32).filter_map(char::from_u32) {
            let shown = escaped(&format!("a{c}b"));
            assert!(!shown.contains(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}']), "{c:?} -> {shown:?}");
        }
    }
}
