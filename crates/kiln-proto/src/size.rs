//! [`ByteSize`]: a number of bytes as people write it on a command line
//! (`100MiB`, `2GiB`, `512`), and as messages show it.

use std::fmt;
use std::str::FromStr;

/// A number of bytes, parsed from and shown in binary units.
///
/// Parsing accepts a whole number with an optional unit: none, `B` or `bytes`,
/// `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` (powers of 1024; `KB`, `MB`,
/// `GB`, `TB` are read as the same binary units, as `ls -h` shows them), case
/// and a space before the unit not mattering. Display uses the largest unit
/// that shows the value exactly, so a value parses back to itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Why a size did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a size: write a whole number with an optional unit, such as 512, 64KiB, 100MiB or 2GiB")]
pub struct BadByteSize(String);

/// The binary units, largest first, with the names Display uses.
const UNITS: [(u64, &str); 4] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];

impl ByteSize {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = BadByteSize;

    fn from_str(s: &str) -> Result<ByteSize, BadByteSize> {
        let bad = || BadByteSize(s.to_owned());
        let t = s.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" | "bytes" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        number.checked_mul(multiplier).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, name) in UNITS {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{} {name}", self.0 / unit);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn sizes_parse_in_binary_units() {
        for (text, bytes) in [
            ("512", 512),
            ("0", 0),
            ("64KiB", 64 << 10),
            ("100MiB", 100 << 20),
            ("100 mib", 100 << 20),
            ("100M", 100 << 20),
            ("2GiB", 2 << 30),
            ("2GB", 2 << 30),
            ("1TiB", 1 << 40),
            ("7B", 7),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for text in ["", "MiB", "-1", "1.5GiB", "10 parsecs", "99999999999999999999", "20000000TiB"] {
            assert!(text.parse::<ByteSize>().is_err(), "{text} parsed");
        }
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit_and_parse_back() {
        for (bytes, text) in
            [(100 << 20, "100 MiB"), (2 << 30, "2 GiB"), (1536 << 20, "1536 MiB"), (1000, "1000 bytes"), (0, "0 bytes")]
        {
            assert_eq!(ByteSize(bytes).to_string(), text);
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)));
        }
    }
}
