//! Test output is hostile: before it reaches a page it loses its terminal
//! escape sequences (colours, cursor moves, titles) and shows other control
//! characters as visible text, line by line with the terminal's own rule
//! ([`kiln_proto::for_terminal`]). HTML escaping is maud's job and happens
//! after this; this only keeps a page from carrying what a terminal would
//! act on.

/// `s` with ANSI escape sequences removed and other control characters
/// (but line breaks and tabs) shown as escapes (`\r`, `\u{0}`).
pub fn display(s: &str) -> String {
    s.split('\n').map(kiln_proto::for_terminal).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::display;

    #[test]
    fn colours_go_and_controls_show() {
        assert_eq!(display("\u{1b}[31mred\u{1b}[0m plain"), "red plain");
        assert_eq!(display("\u{1b}]0;title\u{7}after"), "after");
        assert_eq!(display("a\rb\u{0}c\n\td"), "a\\rb\\u{0}c\n\td");
        assert_eq!(display("<script>alert(1)</script>"), "<script>alert(1)</script>");
        assert_eq!(display("\u{fffd}ok"), "\u{fffd}ok");
    }
}
