//! Erlang's external term format (the bytes of `:erlang.term_to_binary/1`)
//! for the values the link carries, held as [`rmpv::Value`] on this side.
//!
//! The BEAM reads and writes these frames with its own C code
//! (`binary_to_term(bin, [:safe])`, `term_to_binary/1`), several times
//! cheaper per call than a MessagePack codec written in Elixir.
//!
//! Mapping (both ways):
//! - `nil`, `true`, `false` <-> nil and the booleans (other atoms come in as
//!   `Ext(1, name)`, as the MessagePack codec of the port protocol writes
//!   them, and are never written);
//! - integers (any of the three encodings, bignums up to 64 bits);
//! - floats (`NEW_FLOAT_EXT`; a non-finite float cannot be a BEAM float and
//!   is refused on the way out);
//! - binaries: valid UTF-8 comes in as a string, anything else as bytes;
//!   strings and bytes both go out as binaries;
//! - proper lists (and the byte lists `STRING_EXT` packs) <-> arrays;
//! - maps <-> maps.
//!
//! Everything else (tuples, pids, improper lists, bit strings, compressed
//! terms) is refused with an error, nesting is bounded by
//! [`crate::codec::MAX_DEPTH`], and no length read from the input allocates
//! more than the input holds.

use rmpv::Value as Mp;

const VERSION: u8 = 131;
const NEW_FLOAT: u8 = 70;
const SMALL_INTEGER: u8 = 97;
const INTEGER: u8 = 98;
const ATOM: u8 = 100;
const NIL: u8 = 106;
const STRING: u8 = 107;
const LIST: u8 = 108;
const BINARY: u8 = 109;
const SMALL_BIG: u8 = 110;
const SMALL_ATOM: u8 = 115;
const MAP: u8 = 116;
const ATOM_UTF8: u8 = 118;
const SMALL_ATOM_UTF8: u8 = 119;

/// Why a term could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtfError(pub String);

impl std::fmt::Display for EtfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EtfError {}

fn err<T>(msg: impl Into<String>) -> Result<T, EtfError> {
    Err(EtfError(msg.into()))
}

// ------------------------------------------------------------------ writing

/// Appends the version byte and `value` to `out`.
pub fn encode_into(out: &mut Vec<u8>, value: &Mp) -> Result<(), EtfError> {
    out.push(VERSION);
    write(out, value)
}

/// Appends `value` without the version byte (an element of a term being
/// built by hand, as the link's frames are).
pub fn write(out: &mut Vec<u8>, value: &Mp) -> Result<(), EtfError> {
    match value {
        Mp::Nil => atom(out, "nil"),
        Mp::Boolean(true) => atom(out, "true"),
        Mp::Boolean(false) => atom(out, "false"),
        Mp::Integer(n) => {
            if let Some(i) = n.as_i64() {
                int(out, i);
            } else if let Some(u) = n.as_u64() {
                big(out, false, u);
            } else {
                return err("integer out of range");
            }
        }
        Mp::F32(x) => float(out, f64::from(*x))?,
        Mp::F64(x) => float(out, *x)?,
        Mp::String(s) => binary(out, s.as_bytes()),
        Mp::Binary(b) => binary(out, b),
        Mp::Array(items) => {
            list_header(out, items.len())?;
            for item in items {
                write(out, item)?;
            }
            if !items.is_empty() {
                out.push(NIL);
            }
        }
        Mp::Map(pairs) => {
            out.push(MAP);
            out.extend_from_slice(&len32(pairs.len())?.to_be_bytes());
            for (k, v) in pairs {
                write(out, k)?;
                write(out, v)?;
            }
        }
        Mp::Ext(_, _) => return err("extension values are not written to the BEAM"),
    }
    Ok(())
}

/// The header of a proper list of `n` elements (the caller writes them and,
/// for `n > 0`, the closing `NIL`); `n == 0` is the empty list itself.
pub fn list_header(out: &mut Vec<u8>, n: usize) -> Result<(), EtfError> {
    if n == 0 {
        out.push(NIL);
    } else {
        out.push(LIST);
        out.extend_from_slice(&len32(n)?.to_be_bytes());
    }
    Ok(())
}

/// Closes a non-empty list started with [`list_header`].
pub fn list_end(out: &mut Vec<u8>) {
    out.push(NIL);
}

fn len32(n: usize) -> Result<u32, EtfError> {
    u32::try_from(n).or_else(|_| err("too long for a term"))
}

/// A `SMALL_ATOM_UTF8_EXT` (names up to 255 bytes).
pub fn atom(out: &mut Vec<u8>, name: &str) {
    out.push(SMALL_ATOM_UTF8);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

/// A binary (an Elixir string when UTF-8).
pub fn binary(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(BINARY);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// An integer, in its shortest encoding.
pub fn int(out: &mut Vec<u8>, i: i64) {
    if (0..=255).contains(&i) {
        out.push(SMALL_INTEGER);
        out.push(i as u8);
    } else if let Ok(small) = i32::try_from(i) {
        out.push(INTEGER);
        out.extend_from_slice(&small.to_be_bytes());
    } else {
        big(out, i < 0, i.unsigned_abs());
    }
}

/// An unsigned integer.
pub fn uint(out: &mut Vec<u8>, u: u64) {
    match i64::try_from(u) {
        Ok(i) => int(out, i),
        Err(_) => big(out, false, u),
    }
}

fn big(out: &mut Vec<u8>, negative: bool, magnitude: u64) {
    let bytes = magnitude.to_le_bytes();
    let n = 8 - (magnitude.leading_zeros() / 8) as usize;
    out.push(SMALL_BIG);
    out.push(n as u8);
    out.push(u8::from(negative));
    out.extend_from_slice(&bytes[..n]);
}

fn float(out: &mut Vec<u8>, x: f64) -> Result<(), EtfError> {
    if !x.is_finite() {
        return err("non-finite floats (NaN, Infinity) are not BEAM floats");
    }
    out.push(NEW_FLOAT);
    out.extend_from_slice(&x.to_be_bytes());
    Ok(())
}

// ------------------------------------------------------------------ reading

/// A reader over the bytes of one term.
pub struct Reader<'a> {
    bytes: &'a [u8],
    max_depth: usize,
}

impl<'a> Reader<'a> {
    /// Starts after the version byte (refused if missing or another).
    pub fn new(bytes: &'a [u8], max_depth: usize) -> Result<Reader<'a>, EtfError> {
        match bytes.split_first() {
            Some((&VERSION, rest)) => Ok(Reader {
                bytes: rest,
                max_depth,
            }),
            Some((v, _)) => err(format!("not a term (version byte {v})")),
            None => err("empty frame"),
        }
    }

    /// Nothing left to read.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EtfError> {
        if n > self.bytes.len() {
            return err("truncated term");
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, EtfError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize, EtfError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }

    fn u32(&mut self) -> Result<usize, EtfError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    /// Reads the header of a proper list: its length (the caller reads the
    /// elements, then [`Reader::list_tail`] when the length is not 0).
    pub fn list_header(&mut self) -> Result<usize, EtfError> {
        match self.u8()? {
            NIL => Ok(0),
            LIST => self.u32(),
            _ => err("not a list"),
        }
    }

    /// The tail of a non-empty list: must be `[]`.
    pub fn list_tail(&mut self) -> Result<(), EtfError> {
        match self.u8()? {
            NIL => Ok(()),
            _ => err("improper list"),
        }
    }

    /// Reads one term.
    pub fn term(&mut self) -> Result<Mp, EtfError> {
        self.term_at(0)
    }

    fn term_at(&mut self, depth: usize) -> Result<Mp, EtfError> {
        if depth > self.max_depth {
            return err("term nested too deeply");
        }
        let tag = self.u8()?;
        Ok(match tag {
            SMALL_INTEGER => Mp::from(self.u8()?),
            INTEGER => {
                let b = self.take(4)?;
                Mp::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            }
            SMALL_BIG => {
                let n = self.u8()? as usize;
                let sign = self.u8()?;
                let digits = self.take(n)?;
                if digits.iter().skip(8).any(|d| *d != 0) {
                    return err("integer out of range");
                }
                let mut le = [0u8; 8];
                let used = n.min(8);
                le[..used].copy_from_slice(&digits[..used]);
                let magnitude = u64::from_le_bytes(le);
                if sign == 0 {
                    Mp::from(magnitude)
                } else if magnitude <= 1 << 63 {
                    Mp::from((magnitude as i64).wrapping_neg())
                } else {
                    return err("integer out of range");
                }
            }
            NEW_FLOAT => {
                let b = self.take(8)?;
                Mp::F64(f64::from_be_bytes(b.try_into().expect("8 bytes")))
            }
            ATOM | ATOM_UTF8 => {
                let n = self.u16()?;
                atom_value(self.take(n)?)?
            }
            SMALL_ATOM | SMALL_ATOM_UTF8 => {
                let n = self.u8()? as usize;
                atom_value(self.take(n)?)?
            }
            BINARY => {
                let n = self.u32()?;
                let b = self.take(n)?;
                match std::str::from_utf8(b) {
                    Ok(s) => Mp::from(s),
                    Err(_) => Mp::Binary(b.to_vec()),
                }
            }
            NIL => Mp::Array(Vec::new()),
            STRING => {
                let n = self.u16()?;
                Mp::Array(self.take(n)?.iter().map(|b| Mp::from(*b)).collect())
            }
            LIST => {
                let n = self.u32()?;
                // Every element takes at least one byte.
                if n > self.bytes.len() {
                    return err("truncated term");
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.term_at(depth + 1)?);
                }
                self.list_tail()?;
                Mp::Array(items)
            }
            MAP => {
                let n = self.u32()?;
                if n > self.bytes.len() / 2 {
                    return err("truncated term");
                }
                let mut pairs = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = self.term_at(depth + 1)?;
                    let v = self.term_at(depth + 1)?;
                    pairs.push((k, v));
                }
                Mp::Map(pairs)
            }
            other => return err(format!("unsupported term (tag {other})")),
        })
    }
}

fn atom_value(name: &[u8]) -> Result<Mp, EtfError> {
    Ok(match name {
        b"nil" => Mp::Nil,
        b"true" => Mp::Boolean(true),
        b"false" => Mp::Boolean(false),
        other => Mp::Ext(1, other.to_vec()),
    })
}

/// Decodes one whole term (trailing bytes are an error).
pub fn decode(bytes: &[u8]) -> Result<Mp, EtfError> {
    let mut r = Reader::new(bytes, crate::codec::MAX_DEPTH)?;
    let v = r.term()?;
    if !r.is_empty() {
        return err("trailing bytes after the term");
    }
    Ok(v)
}

/// Encodes one term, version byte first.
pub fn encode(value: &Mp) -> Result<Vec<u8>, EtfError> {
    let mut out = Vec::new();
    encode_into(&mut out, value)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: Mp) {
        assert_eq!(decode(&encode(&v).unwrap()).unwrap(), v, "{v:?}");
    }

    #[test]
    fn values_round_trip() {
        for v in [
            Mp::Nil,
            Mp::Boolean(true),
            Mp::Boolean(false),
            Mp::from(0),
            Mp::from(255),
            Mp::from(256),
            Mp::from(-1),
            Mp::from(i32::MIN),
            Mp::from(i64::from(i32::MAX) + 1),
            Mp::from(i64::MIN),
            Mp::from(i64::MAX),
            Mp::from(u64::MAX),
            Mp::F64(0.5),
            Mp::F64(-1e300),
            Mp::from("héllo"),
            Mp::from(""),
            Mp::Binary(vec![0xff, 0, 1]),
            Mp::Array(vec![]),
            Mp::Array(vec![Mp::from(1), Mp::from("x"), Mp::Nil]),
            Mp::Map(vec![
                (Mp::from("a"), Mp::Map(vec![])),
                (Mp::from("b"), Mp::from(2)),
            ]),
        ] {
            round_trip(v);
        }
    }

    #[test]
    fn reads_what_term_to_binary_writes() {
        // :erlang.term_to_binary(["reply", 7, %{"ok" => true}])
        let bytes = [
            131, 108, 0, 0, 0, 3, 109, 0, 0, 0, 5, b'r', b'e', b'p', b'l', b'y', 97, 7, 116, 0, 0,
            0, 1, 109, 0, 0, 0, 2, b'o', b'k', 119, 4, b't', b'r', b'u', b'e', 106,
        ];
        assert_eq!(
            decode(&bytes).unwrap(),
            Mp::Array(vec![
                Mp::from("reply"),
                Mp::from(7),
                Mp::Map(vec![(Mp::from("ok"), Mp::Boolean(true))])
            ])
        );
        // :erlang.term_to_binary([1, 2, 3]) is a STRING_EXT.
        assert_eq!(
            decode(&[131, 107, 0, 3, 1, 2, 3]).unwrap(),
            Mp::Array(vec![Mp::from(1), Mp::from(2), Mp::from(3)])
        );
        // -2^63 and 2^64 - 1 as SMALL_BIG_EXT; 2^64 is out of range.
        assert_eq!(
            decode(&[131, 110, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0x80]).unwrap(),
            Mp::from(i64::MIN)
        );
        assert_eq!(
            decode(&[131, 110, 8, 0, 255, 255, 255, 255, 255, 255, 255, 255]).unwrap(),
            Mp::from(u64::MAX)
        );
        assert!(decode(&[131, 110, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        // Other atoms come in as extension 1; never written.
        assert_eq!(
            decode(&[131, 119, 2, b'o', b'k']).unwrap(),
            Mp::Ext(1, b"ok".to_vec())
        );
        assert!(encode(&Mp::Ext(1, b"ok".to_vec())).is_err());
    }

    #[test]
    fn bad_terms_are_errors() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[130, 106]).is_err());
        assert!(decode(&[131]).is_err());
        // A tuple, an improper list, a truncated binary, trailing bytes.
        assert!(decode(&[131, 104, 1, 97, 1]).is_err());
        assert!(decode(&[131, 108, 0, 0, 0, 1, 97, 1, 97, 2]).is_err());
        assert!(decode(&[131, 109, 0, 0, 0, 9, 1]).is_err());
        assert!(decode(&[131, 106, 0]).is_err());
        // A huge claimed length allocates nothing.
        assert!(decode(&[131, 108, 0xff, 0xff, 0xff, 0xff, 106]).is_err());
        assert!(decode(&[131, 116, 0xff, 0xff, 0xff, 0xff]).is_err());
        // Deep nesting is refused, not recursed into.
        let mut deep = vec![131u8];
        for _ in 0..10_000 {
            deep.extend_from_slice(&[108, 0, 0, 0, 1]);
        }
        assert!(decode(&deep).is_err());
        // Non-finite floats cannot be written.
        assert!(encode(&Mp::F64(f64::NAN)).is_err());
        assert!(encode(&Mp::F64(f64::INFINITY)).is_err());
    }
}
