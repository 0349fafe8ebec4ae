//! Reads the batch driver's output as it arrives and turns it into events.
//!
//! The driver (driver.py) prints one JSON object per line on its stdout
//! (see its docstring): a greeting, results (each naming its file), each
//! file's completion, and `done` at the end. This module never fails: a line
//! that is not the protocol is counted and quoted in the error about the
//! files left unfinished, and a line longer than [`MAX_LINE`] is dropped
//! rather than buffered without end.

use serde::Deserialize;

/// How a test ended, as the driver spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Passed.
    Pass,
    /// An assertion failed.
    Fail,
    /// Raised, or could not run.
    Error,
    /// Skipped.
    Skip,
    /// Failed as expected.
    Xfail,
    /// Passed although expected to fail.
    Xpass,
}

/// One test's result, as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Report {
    /// The file (as given to the driver) the test belongs to.
    pub file: String,
    /// unittest's id for the test (or the module name for a module error).
    pub id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took.
    pub duration_ms: u64,
    /// Traceback, skip reason, or empty.
    pub message: String,
}

/// One line of the driver's protocol.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Line {
    /// A test ended.
    Result(Report),
    /// Every result of this file has been printed.
    FileDone {
        #[serde(rename = "file-done")]
        file_done: String,
    },
    /// The first line: the driver runs, on this Python.
    Hello { driver: u32, python: String },
    /// The interpreter is too old for the driver (from bootstrap.py).
    TooOld {
        #[serde(rename = "too-old")]
        too_old: String,
    },
    /// The driver finished normally.
    Done { done: bool },
    /// With `--more`: every file given so far is done; it waits for more.
    Idle { idle: bool },
}

/// The longest line kept: a result's message is capped by the driver well
/// below this.
pub const MAX_LINE: usize = 8 << 20;
/// How much of a malformed line goes into an error message.
const BAD_LINE_PREFIX: usize = 300;

/// Splits a byte stream into protocol lines.
#[derive(Default)]
pub struct Reader {
    partial: Vec<u8>,
    /// Set while skipping the rest of a line that was too long.
    skipping: bool,
    /// How many lines were not the protocol.
    pub bad_lines: usize,
    /// The start of the first of them.
    pub first_bad_line: Option<String>,
}

impl Reader {
    /// Feeds `bytes` and returns the complete lines they end.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        while let Some(end) = bytes.iter().position(|b| *b == b'\n') {
            if self.skipping {
                self.skipping = false;
            } else {
                self.partial.extend_from_slice(&bytes[..end]);
                let line = std::mem::take(&mut self.partial);
                lines.extend(self.parse(&line));
            }
            bytes = &bytes[end + 1..];
        }
        if !self.skipping {
            self.partial.extend_from_slice(bytes);
            if self.partial.len() > MAX_LINE {
                let line = std::mem::take(&mut self.partial);
                self.bad(&line);
                self.skipping = true;
            }
        }
        lines
    }

    /// What is left when the stream ends: a last line without a newline.
    pub fn finish(&mut self) -> Vec<Line> {
        let line = std::mem::take(&mut self.partial);
        if self.skipping { Vec::new() } else { self.parse(&line).into_iter().collect() }
    }

    fn parse(&mut self, line: &[u8]) -> Option<Line> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(line) => Some(line),
            Err(_) => {
                self.bad(line);
                None
            }
        }
    }

    fn bad(&mut self, line: &[u8]) {
        self.bad_lines += 1;
        if self.first_bad_line.is_none() {
            let prefix = &line[..line.len().min(BAD_LINE_PREFIX)];
            self.first_bad_line = Some(kiln_plugin_sdk::head(&String::from_utf8_lossy(prefix), BAD_LINE_PREFIX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_are_joined() {
        let mut reader = Reader::default();
        let text = "{\"driver\": 2, \"python\": \"3.11.7\"}\n{\"file\": \"tests/test_a.py\", \"id\": \"tests.test_a.T.t\", \
                    \"outcome\": \"fail\", \"duration_ms\": 3, \"message\": \"boom\"}\n{\"file-done\": \"tests/test_a.py\"}\n\
                    {\"done\": true}";
        let mut lines = Vec::new();
        for chunk in text.as_bytes().chunks(7) {
            lines.extend(reader.push(chunk));
        }
        lines.extend(reader.finish());
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(matches!(&lines[0], Line::Hello { python, .. } if python == "3.11.7"));
        let Line::Result(report) = &lines[1] else { panic!("{:?}", lines[1]) };
        assert_eq!((report.file.as_str(), report.id.as_str()), ("tests/test_a.py", "tests.test_a.T.t"));
        assert_eq!((report.outcome, report.duration_ms, report.message.as_str()), (Outcome::Fail, 3, "boom"));
        assert_eq!(lines[2], Line::FileDone { file_done: "tests/test_a.py".to_owned() });
        assert!(matches!(lines[3], Line::Done { .. }));
        assert_eq!(reader.bad_lines, 0);
    }

    #[test]
    fn garbage_is_counted_and_quoted_and_long_lines_are_dropped() {
        let mut reader = Reader::default();
        assert!(reader.push(b"hello world\n{\"too-old\": \"2.7.18\"}\n").len() == 1);
        let long = vec![b'x'; MAX_LINE + 10];
        assert!(reader.push(&long).is_empty());
        assert!(reader.push(b"yyy\n{\"done\": true}\n").len() == 1);
        assert_eq!(reader.bad_lines, 2);
        assert_eq!(reader.first_bad_line.as_deref(), Some("hello world"));
    }
}
