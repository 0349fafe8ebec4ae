//! Test output is hostile: before it reaches a page it loses its terminal
//! escape sequences (colours, cursor moves, titles) and shows other control
//! characters as visible text. HTML escaping is maud's job and happens
//! after this; this only keeps a page from carrying what a terminal would
//! act on.

/// `s` with ANSI escape sequences removed and other control characters
/// (but line breaks and tabs) shown as `\xNN`.
pub fn display(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.peek() {
                // CSI: ESC [ parameters… final byte in @..~
                Some('[') => {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: ESC ] … ended by BEL or ESC \
                Some(']') => {
                    chars.next();
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                            chars.next();
                            break;
                        }
                    }
                }
                // Any other escape: the one character after it.
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
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::display;

    #[test]
    fn colours_go_and_controls_show() {
        assert_eq!(display("\u{1b}[31mred\u{1b}[0m plain"), "red plain");
        assert_eq!(display("\u{1b}]0;title\u{7}after"), "after");
        assert_eq!(display("a\rb\u{0}c\n\td"), "a\\x0db\\x00c\n\td");
        assert_eq!(display("<script>alert(1)</script>"), "<script>alert(1)</script>");
        assert_eq!(display("\u{fffd}ok"), "\u{fffd}ok");
    }
}
