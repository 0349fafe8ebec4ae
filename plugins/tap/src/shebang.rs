//! Which program runs a test script: the interpreter its `#!` line names,
//! by bare name, or `sh` when it has none.
//!
//! A plugin cannot execute a file from the checkout directly: the runner
//! starts only programs its operator allows, by bare name, resolved on its
//! own `PATH` at start-up. So the `#!` line is read here and mapped onto one
//! of those names, the way the kernel would run the file: `#!/bin/bash -e`
//! runs `bash -e FILE` (the rest of the line is one argument, as Linux
//! passes it), `#!/usr/bin/env python3` runs `python3 FILE` (words after the
//! program become arguments, as with `env -S`), and a file without a `#!`
//! line runs with `sh`, which is what `execvp` does with such a file.
//!
//! WASI shows a plugin no permission bits, so "executable" cannot be checked
//! here; the file's name (the plugin's claims) and its `#!` line decide.

/// The program (a bare name) and its arguments before the script's path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interpreter {
    /// The program's bare name, e.g. `sh`.
    pub program: String,
    /// Arguments that go before the script's path.
    pub args: Vec<String>,
}

/// Reads the interpreter from the start of a script (its first line is
/// enough), or says why its `#!` line cannot be used.
pub fn interpreter(head: &[u8]) -> Result<Interpreter, String> {
    let Some(rest) = head.strip_prefix(b"#!") else {
        return Ok(Interpreter { program: "sh".to_owned(), args: Vec::new() });
    };
    let line_end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let line = std::str::from_utf8(&rest[..line_end]).map_err(|_| "its #! line is not UTF-8".to_owned())?;
    let line = line.trim();
    let (path, tail) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let tail = tail.trim();
    let name = path.rsplit('/').next().unwrap_or(path);
    if name == "env" {
        // `env [-S] [-i] [NAME=VALUE]… PROGRAM [ARG]…`
        let mut words = tail.split_whitespace().skip_while(|w| w.starts_with('-') || w.contains('='));
        let program = words.next().ok_or_else(|| format!("its #! line `#!{line}` names no program after env"))?;
        return bare(program, words.map(str::to_owned).collect(), line);
    }
    let args = if tail.is_empty() { Vec::new() } else { vec![tail.to_owned()] };
    bare(name, args, line)
}

fn bare(program: &str, args: Vec<String>, line: &str) -> Result<Interpreter, String> {
    if program.is_empty() || program.contains('/') {
        return Err(format!("its #! line `#!{line}` names no program"));
    }
    Ok(Interpreter { program: program.to_owned(), args })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(head: &str) -> (String, Vec<String>) {
        let i = interpreter(head.as_bytes()).unwrap();
        (i.program, i.args)
    }

    #[test]
    fn reads_the_hash_bang_line() {
        assert_eq!(program("echo 1..0\n"), ("sh".to_owned(), vec![]));
        assert_eq!(program(""), ("sh".to_owned(), vec![]));
        assert_eq!(program("#!/bin/sh\necho"), ("sh".to_owned(), vec![]));
        assert_eq!(program("#! /usr/bin/bash -e -u\n"), ("bash".to_owned(), vec!["-e -u".to_owned()]));
        assert_eq!(program("#!/usr/bin/env python3\n"), ("python3".to_owned(), vec![]));
        assert_eq!(program("#!/usr/bin/env -S perl -w\r\n"), ("perl".to_owned(), vec!["-w".to_owned()]));
        assert_eq!(program("#!/usr/bin/env LC_ALL=C bash"), ("bash".to_owned(), vec![]));
    }

    #[test]
    fn refuses_a_line_without_a_program() {
        assert!(interpreter(b"#!\n").is_err());
        assert!(interpreter(b"#!/usr/bin/env\n").is_err());
        assert!(interpreter(b"#!/\n").is_err());
    }
}
