//! The log writer: every event is exactly one line on stderr.
//!
//! Outside values are escaped where they are logged (`kiln_proto::Escaped`),
//! but a message built elsewhere (a plugin's failure text, an error chain
//! quoting a peer) may still hold a line break, and a line break in a log is
//! a forged next line. The fmt layer writes each event with one `write_all`
//! ending in `\n`; this writer escapes everything before that final newline:
//! all control characters in plain-text logs (files, pipes), and the line
//! breaks only when colours are on (their escape sequences must pass).

use std::io::{self, Write};

use kiln_proto::Escaped;

/// Writes one formatted event to stderr as one line.
pub struct OneLine {
    /// Whether the formatter emits ANSI colour sequences.
    pub ansi: bool,
}

impl OneLine {
    fn line(&self, buf: &[u8]) -> Vec<u8> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, "\n"),
            None => (buf, ""),
        };
        let text = String::from_utf8_lossy(body);
        let line = if self.ansi { escape_line_breaks(&text) } else { Escaped(&text).to_string() };
        format!("{line}{end}").into_bytes()
    }
}

fn escape_line_breaks(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' | '\u{0b}' | '\u{0c}' | '\u{85}' | '\u{2028}' | '\u{2029}' => {
                out.extend(c.escape_default());
            }
            c => out.push(c),
        }
    }
    out
}

impl Write for OneLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        io::stderr().lock().write_all(&self.line(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stays_one_line() {
        let plain = OneLine { ansi: false };
        let event = "2026-12-01T00:00:00Z  WARN plugin failed: x.py\n2026-01-01T00:00:00Z  INFO forged\n";
        let line = String::from_utf8(plain.line(event.as_bytes())).unwrap();
        assert_eq!(line, "2026-12-01T00:00:00Z  WARN plugin failed: x.py\\n2026-01-01T00:00:00Z  INFO forged\n");
        assert_eq!(plain.line(b"a\rb\x1b[2J"), b"a\\rb\\u{1b}[2J");
        // With colours on, their sequences pass and line breaks still do not.
        let coloured = OneLine { ansi: true };
        assert_eq!(coloured.line(b"\x1b[32mINFO\x1b[0m a\nb\n"), b"\x1b[32mINFO\x1b[0m a\\nb\n");
    }
}
