//! The pack scanner: walks a pack's bytes before libgit2 indexes them, and
//! refuses any pack whose objects would expand past the [`Limits`].
//!
//! It reads each object's header (type and declared size), for a delta the
//! delta's own header (the size of the object it produces), and inflates every
//! zlib stream into one fixed buffer, discarding the output, to find where the
//! stream ends and to check that it really inflates to the size it declares.
//! Nothing is kept but a few counters, so a pack of any content costs a fixed
//! amount of memory, and it never inflates more than the blob cap per object.
//!
//! Pack format (git's `Documentation/gitformat-pack.txt`): `PACK`, a version
//! (2 or 3) and an object count, all big-endian; then per object a
//! variable-length header (type in bits 4–6 of the first byte, size in 4 bits
//! then 7 bits per byte, low bits first), for an `OFS_DELTA` a base offset, for
//! a `REF_DELTA` a 20-byte base id, then the zlib stream; then a 20-byte checksum.
//! A delta's data starts with two little-endian base-128 numbers: the base's
//! size and the result's size.

use flate2::{Decompress, FlushDecompress, Status};

use crate::limits::{Cap, Limits, Place, TooLarge};

/// The bytes of a SHA-1 object id (the pack's trailer, a `REF_DELTA`'s base).
const ID_LEN: usize = 20;
/// The size of the buffer each zlib stream is inflated into, and discarded.
const BUFFER: usize = 64 << 10;

/// Why a pack was refused.
#[derive(Debug)]
pub(crate) enum ScanError {
    /// An object, or the pack as a whole, would expand past a cap.
    TooLarge(TooLarge),
    /// The bytes are not a well-formed pack.
    Malformed(String),
}

impl ScanError {
    fn malformed(offset: usize, what: impl std::fmt::Display) -> ScanError {
        ScanError::Malformed(format!("malformed pack at offset {offset}: {what}"))
    }
}

/// Checks every object of `pack` against `limits`; see the module docs.
pub(crate) fn scan(pack: &[u8], limits: &Limits) -> Result<(), ScanError> {
    if pack.len() < 12 + ID_LEN || &pack[..4] != b"PACK" {
        return Err(ScanError::Malformed("not a git pack (no `PACK` header, or too short)".into()));
    }
    let version = u32::from_be_bytes([pack[4], pack[5], pack[6], pack[7]]);
    if version != 2 && version != 3 {
        return Err(ScanError::malformed(4, format_args!("unsupported pack version {version}")));
    }
    let count = u32::from_be_bytes([pack[8], pack[9], pack[10], pack[11]]);
    // The objects end where the checksum starts.
    let body = &pack[..pack.len() - ID_LEN];
    let mut pos = 12;
    let mut total: u64 = 0;
    let mut inflater = Decompress::new(true);
    let mut buffer = vec![0u8; BUFFER];
    for index in 0..count {
        let start = pos;
        let (kind, declared, next) = object_header(body, pos)?;
        pos = next;
        let place = |kind: &'static str| Place::InPack { index, offset: start as u64, kind };
        let too_large = |cap: Cap, size: u64, kind: &'static str| {
            ScanError::TooLarge(TooLarge { cap, limit: limits.get(cap), size, at: place(kind), object: None })
        };
        let name = match kind {
            1 => "commit",
            2 => "tree",
            3 => "blob",
            4 => "tag",
            6 => {
                pos = skip_base_offset(body, pos)?;
                "delta"
            }
            7 => {
                if body.len() - pos < ID_LEN {
                    return Err(ScanError::malformed(pos, "truncated delta base id"));
                }
                pos += ID_LEN;
                "delta"
            }
            other => return Err(ScanError::malformed(start, format_args!("unknown object type {other}"))),
        };
        // The declared size is checked before a byte is inflated.
        if declared > limits.max_blob {
            return Err(too_large(Cap::Blob, declared, name));
        }
        let is_delta = name == "delta";
        let mut head = DeltaHead::default();
        let used = inflate(&mut inflater, &body[pos..], declared, &mut buffer, is_delta.then_some(&mut head))
            .map_err(|e| ScanError::malformed(start, e))?;
        pos += used;
        let expanded = if is_delta {
            let Some(result) = head.result_size() else {
                return Err(ScanError::malformed(start, "delta without a valid header"));
            };
            if result > limits.max_blob {
                return Err(too_large(Cap::Blob, result, name));
            }
            result
        } else {
            declared
        };
        total = total.saturating_add(expanded);
        if total > limits.max_pack_expansion {
            return Err(too_large(Cap::PackExpansion, total, name));
        }
    }
    Ok(())
}

/// Reads an object header at `pos`: (type, declared size, position after it).
fn object_header(body: &[u8], pos: usize) -> Result<(u8, u64, usize), ScanError> {
    let mut at = pos;
    let byte = |at: usize| body.get(at).copied().ok_or_else(|| ScanError::malformed(at, "truncated object header"));
    let first = byte(at)?;
    at += 1;
    let kind = (first >> 4) & 0b111;
    let mut size = u128::from(first & 0x0f);
    let mut shift = 4;
    let mut more = first & 0x80 != 0;
    while more {
        let b = byte(at)?;
        at += 1;
        size |= u128::from(b & 0x7f) << shift;
        shift += 7;
        more = b & 0x80 != 0;
        if shift > 70 {
            return Err(ScanError::malformed(pos, "object size header too long"));
        }
    }
    let size = u64::try_from(size).map_err(|_| ScanError::malformed(pos, "object size out of range"))?;
    Ok((kind, size, at))
}

/// Skips an `OFS_DELTA`'s base offset (7 bits per byte, high bits first).
fn skip_base_offset(body: &[u8], pos: usize) -> Result<usize, ScanError> {
    for (n, b) in body.iter().skip(pos).take(10).enumerate() {
        if b & 0x80 == 0 {
            return Ok(pos + n + 1);
        }
    }
    Err(ScanError::malformed(pos, "truncated or overlong delta base offset"))
}

/// The first bytes of a delta's data, enough to hold its two size numbers.
#[derive(Default)]
struct DeltaHead {
    bytes: Vec<u8>,
}

impl DeltaHead {
    /// The most bytes two base-128 64-bit numbers take.
    const KEEP: usize = 20;

    /// The size of the object the delta produces, if the header is complete.
    fn result_size(&self) -> Option<u64> {
        let (_, after_base) = varint(&self.bytes)?;
        let (result, _) = varint(&self.bytes[after_base..])?;
        Some(result)
    }
}

/// A little-endian base-128 number at the start of `bytes`: (value, length).
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (n, b) in bytes.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f).checked_shl(7 * n as u32)?;
        if b & 0x80 == 0 {
            return Some((value, n + 1));
        }
    }
    None
}

/// Inflates the zlib stream at the start of `input` into `buffer`, discarding
/// the output (except a delta's first bytes, into `head`), and checks that it
/// produces exactly `declared` bytes. Returns how many input bytes it used.
fn inflate(
    z: &mut Decompress,
    input: &[u8],
    declared: u64,
    buffer: &mut [u8],
    mut head: Option<&mut DeltaHead>,
) -> Result<usize, String> {
    z.reset(true);
    loop {
        let (before_in, before_out) = (z.total_in(), z.total_out());
        let rest = input.get(before_in as usize..).unwrap_or_default();
        let status = z.decompress(rest, buffer, FlushDecompress::None).map_err(|e| format!("bad zlib data: {e}"))?;
        let produced = (z.total_out() - before_out) as usize;
        if let Some(head) = head.as_deref_mut() {
            let want = DeltaHead::KEEP.saturating_sub(head.bytes.len()).min(produced);
            head.bytes.extend_from_slice(&buffer[..want]);
        }
        if z.total_out() > declared {
            return Err(format!("the object inflates to more than its declared {declared} bytes"));
        }
        match status {
            Status::StreamEnd => break,
            Status::Ok | Status::BufError => {
                if z.total_in() == before_in && z.total_out() == before_out {
                    return Err("truncated zlib stream".into());
                }
            }
        }
    }
    if z.total_out() != declared {
        return Err(format!("the object inflates to {} bytes, not its declared {declared}", z.total_out()));
    }
    Ok(z.total_in() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_parse_and_overlong_ones_are_refused() {
        assert_eq!(varint(&[0x05]), Some((5, 1)));
        assert_eq!(varint(&[0x80 | 0x10, 0x01]), Some((0x90, 2)));
        assert_eq!(varint(&[0x80; 11]), None);
        assert_eq!(varint(&[0x80]), None);
        assert_eq!(object_header(&[0x3f], 0).ok(), Some((3, 15, 1)));
        assert!(object_header(&[0xff; 12], 0).is_err());
        assert!(object_header(&[0xb0], 0).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let limits = Limits::default();
        for len in 0..400 {
            let mut bytes: Vec<u8> = b"PACK\0\0\0\x02\0\0\0\x03".to_vec();
            bytes.extend((0..len).map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            }));
            let _ = scan(&bytes, &limits);
        }
    }
}
