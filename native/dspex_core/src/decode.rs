//! A bounded MessagePack reader over a byte slice, the ground floor of the
//! snapshot decoder. It builds the engine's types directly, never a generic
//! tree of the whole input.
//!
//! Invariants (tests below):
//! - Nothing is allocated for a length before the length is checked: against
//!   the bytes left (every element takes at least one byte) and against the
//!   caller's [`Budget`], charged as [`Value::heap_size`] counts.
//! - Nesting is bounded by [`MAX_DEPTH`] as [`Value::depth`] counts it, so a
//!   decoded value passes `Limits::check_value` by construction.
//! - Floats are finite (Erlang has no NaN or infinity).
//! - Strings are borrowed from the input; skipping an unknown field
//!   allocates nothing.
//! - Never panics, whatever the bytes.

use crate::error::{Error, Result};
use crate::value::{Value, EXT_ATOM, EXT_TUPLE, MAX_DEPTH};

/// Longest atom name (the BEAM's limit, in characters; bytes here).
const MAX_ATOM_BYTES: usize = 255;
const SLOT: usize = std::mem::size_of::<Value>();

fn bad(what: impl Into<String>) -> Error {
    Error::InvalidSnapshot(what.into())
}

/// Heap bytes a value may still take; charged before each allocation.
pub struct Budget {
    left: usize,
    max: usize,
}

impl Budget {
    pub fn new(max: usize) -> Budget {
        Budget { left: max, max }
    }

    fn charge(&mut self, n: usize) -> Result<()> {
        self.left = self.left.checked_sub(n).ok_or(Error::TooLarge(self.max))?;
        Ok(())
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// A capacity to reserve for `n` items of at least `min_bytes` each in
    /// the input: never more than the input could hold, so a lying length
    /// costs nothing up front.
    pub fn capacity_for(&self, n: usize, min_bytes: usize) -> usize {
        n.min(self.remaining() / min_bytes.max(1))
    }

    fn peek(&self) -> Result<u8> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or_else(|| bad("unexpected end of input"))
    }

    fn byte(&mut self) -> Result<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(bad("unexpected end of input"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len8(&mut self) -> Result<usize> {
        Ok(self.byte()? as usize)
    }

    fn len16(&mut self) -> Result<usize> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }

    fn len32(&mut self) -> Result<usize> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    /// Consumes a nil if one comes next.
    pub fn nil(&mut self) -> Result<bool> {
        if self.peek()? == 0xc0 {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn next_is_array(&self) -> Result<bool> {
        Ok(matches!(self.peek()?, 0x90..=0x9f | 0xdc | 0xdd))
    }

    pub fn map_len(&mut self) -> Result<usize> {
        match self.byte()? {
            b @ 0x80..=0x8f => Ok((b & 0x0f) as usize),
            0xde => self.len16(),
            0xdf => self.len32(),
            _ => Err(bad("expected a map")),
        }
    }

    pub fn array_len(&mut self) -> Result<usize> {
        match self.byte()? {
            b @ 0x90..=0x9f => Ok((b & 0x0f) as usize),
            0xdc => self.len16(),
            0xdd => self.len32(),
            _ => Err(bad("expected an array")),
        }
    }

    /// A string (or a binary holding UTF-8), borrowed from the input.
    pub fn str(&mut self) -> Result<&'a str> {
        let n = match self.byte()? {
            b @ 0xa0..=0xbf => (b & 0x1f) as usize,
            0xd9 | 0xc4 => self.len8()?,
            0xda | 0xc5 => self.len16()?,
            0xdb | 0xc6 => self.len32()?,
            _ => return Err(bad("expected a string")),
        };
        std::str::from_utf8(self.take(n)?).map_err(|_| bad("a string is not UTF-8"))
    }

    /// An integer, as i128 so every MessagePack integer fits.
    fn integer(&mut self) -> Result<i128> {
        Ok(match self.byte()? {
            b @ 0x00..=0x7f => b as i128,
            b @ 0xe0..=0xff => (b as i8) as i128,
            0xcc => self.byte()? as i128,
            0xcd => u16::from_be_bytes(self.be()?) as i128,
            0xce => u32::from_be_bytes(self.be()?) as i128,
            0xcf => u64::from_be_bytes(self.be()?) as i128,
            0xd0 => i8::from_be_bytes(self.be()?) as i128,
            0xd1 => i16::from_be_bytes(self.be()?) as i128,
            0xd2 => i32::from_be_bytes(self.be()?) as i128,
            0xd3 => i64::from_be_bytes(self.be()?) as i128,
            _ => return Err(bad("expected an integer")),
        })
    }

    pub fn u64(&mut self) -> Result<u64> {
        u64::try_from(self.integer()?).map_err(|_| bad("integer out of range"))
    }

    pub fn i64(&mut self) -> Result<i64> {
        i64::try_from(self.integer()?).map_err(|_| bad("integer out of range"))
    }

    /// The type and payload of an extension.
    fn ext(&mut self, marker: u8) -> Result<(i8, &'a [u8])> {
        let n = match marker {
            0xd4 => 1,
            0xd5 => 2,
            0xd6 => 4,
            0xd7 => 8,
            0xd8 => 16,
            0xc7 => self.len8()?,
            0xc8 => self.len16()?,
            0xc9 => self.len32()?,
            _ => return Err(bad("expected an extension")),
        };
        let ty = self.byte()? as i8;
        Ok((ty, self.take(n)?))
    }

    /// Any value, charged to `budget`. `depth` is the value's own depth
    /// (1 for a whole value), as `Value::depth` counts it.
    pub fn value(&mut self, budget: &mut Budget, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(Error::invalid_arg("nested_too_deeply"));
        }
        let marker = self.peek()?;
        Ok(match marker {
            0xc0 => {
                self.pos += 1;
                Value::Nil
            }
            0xc2 | 0xc3 => {
                self.pos += 1;
                Value::Bool(marker == 0xc3)
            }
            0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 => Value::Int(self.i64()?),
            0xca | 0xcb => {
                self.pos += 1;
                let f = if marker == 0xca {
                    f64::from(f32::from_be_bytes(self.be()?))
                } else {
                    f64::from_be_bytes(self.be()?)
                };
                // Erlang has no NaN or infinity: such a float could never
                // be handed back.
                if !f.is_finite() {
                    return Err(Error::InvalidValue(Value::atom("not_finite")));
                }
                Value::Float(f)
            }
            0xa0..=0xbf | 0xd9..=0xdb | 0xc4..=0xc6 => {
                self.pos += 1;
                let n = match marker {
                    0xa0..=0xbf => (marker & 0x1f) as usize,
                    0xd9 | 0xc4 => self.len8()?,
                    0xda | 0xc5 => self.len16()?,
                    _ => self.len32()?,
                };
                let bytes = self.take(n)?;
                budget.charge(n)?;
                match std::str::from_utf8(bytes) {
                    Ok(s) => Value::Str(s.into()),
                    Err(_) => Value::Bytes(bytes.into()),
                }
            }
            0x90..=0x9f | 0xdc | 0xdd => {
                let n = self.array_len()?;
                Value::List(self.elements(n, budget, depth)?)
            }
            0x80..=0x8f | 0xde | 0xdf => {
                let n = self.map_len()?;
                if n > self.remaining() / 2 {
                    return Err(bad("unexpected end of input"));
                }
                budget.charge(n.saturating_mul(2 * SLOT))?;
                let mut pairs = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = self.value(budget, depth + 1)?;
                    pairs.push((k, self.value(budget, depth + 1)?));
                }
                Value::Map(pairs.into())
            }
            0xd4..=0xd8 | 0xc7..=0xc9 => {
                self.pos += 1;
                match self.ext(marker)? {
                    (EXT_ATOM, name) => match std::str::from_utf8(name) {
                        Ok(s) if s.len() <= MAX_ATOM_BYTES => {
                            budget.charge(s.len())?;
                            Value::Atom(s.into())
                        }
                        _ => return Err(bad("bad atom")),
                    },
                    (EXT_TUPLE, payload) => {
                        let mut inner = Reader::new(payload);
                        let n = inner.array_len()?;
                        let elems = inner.elements(n, budget, depth)?;
                        if !inner.at_end() {
                            return Err(bad("bad tuple"));
                        }
                        Value::Tuple(elems)
                    }
                    (t, _) => return Err(bad(format!("unknown ext type {t}"))),
                }
            }
            _ => return Err(bad("reserved MessagePack marker")),
        })
    }

    /// `n` elements of a list or tuple at `depth`.
    fn elements(&mut self, n: usize, budget: &mut Budget, depth: usize) -> Result<Box<[Value]>> {
        if n > self.remaining() {
            return Err(bad("unexpected end of input"));
        }
        budget.charge(n.saturating_mul(SLOT))?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(budget, depth + 1)?);
        }
        Ok(items.into())
    }

    /// Skips one value (a field this release does not know), allocating
    /// nothing.
    pub fn skip(&mut self, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::invalid_arg("nested_too_deeply"));
        }
        let marker = self.peek()?;
        match marker {
            0x90..=0x9f | 0xdc | 0xdd => {
                for _ in 0..self.array_len()? {
                    self.skip(depth + 1)?;
                }
            }
            0x80..=0x8f | 0xde | 0xdf => {
                for _ in 0..self.map_len()? {
                    self.skip(depth + 1)?;
                    self.skip(depth + 1)?;
                }
            }
            0xd4..=0xd8 | 0xc7..=0xc9 => {
                self.pos += 1;
                self.ext(marker)?;
            }
            0xa0..=0xbf | 0xd9..=0xdb | 0xc4..=0xc6 => {
                self.pos += 1;
                let n = match marker {
                    0xa0..=0xbf => (marker & 0x1f) as usize,
                    0xd9 | 0xc4 => self.len8()?,
                    0xda | 0xc5 => self.len16()?,
                    _ => self.len32()?,
                };
                self.take(n)?;
            }
            _ => {
                // Scalars: decoding one allocates nothing.
                self.value(&mut Budget::new(0), depth)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8], budget: usize) -> Result<Value> {
        let mut r = Reader::new(bytes);
        let v = r.value(&mut Budget::new(budget), 1)?;
        assert!(r.at_end());
        Ok(v)
    }

    #[test]
    fn reads_what_the_encoder_writes() {
        let v = Value::Map(
            vec![
                (
                    Value::atom("a"),
                    Value::Tuple(vec![Value::Int(-1), Value::str("x"), Value::Nil].into()),
                ),
                (
                    Value::str("b"),
                    Value::List(
                        vec![
                            Value::Float(0.5),
                            Value::Int(i64::MIN),
                            Value::Int(i64::MAX),
                            Value::Bool(true),
                            Value::Bytes(vec![0xff, 0xfe].into()),
                        ]
                        .into(),
                    ),
                ),
            ]
            .into(),
        );
        let bytes = rmp_serde::to_vec(&v).unwrap();
        assert_eq!(decode(&bytes, 1 << 20).unwrap(), v);
        // The budget is exactly what heap_size counts.
        assert!(decode(&bytes, v.heap_size()).is_ok());
        assert_eq!(
            decode(&bytes, v.heap_size() - 1),
            Err(Error::TooLarge(v.heap_size() - 1))
        );
    }

    #[test]
    fn lying_lengths_fail_before_allocating() {
        for bytes in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf, 0xff, 0xff, 0xff, 0xff],
            &[0xdb, 0xff, 0xff, 0xff, 0xff],
            &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
        ] {
            assert!(decode(bytes, usize::MAX).is_err());
        }
    }

    #[test]
    fn depth_is_bounded_as_check_value_counts_it() {
        let nest = |n: usize| {
            let mut v = Value::Nil;
            for _ in 0..n {
                v = Value::List(vec![v].into());
            }
            v
        };
        let ok = nest(MAX_DEPTH - 1);
        assert_eq!(ok.depth(), MAX_DEPTH);
        assert_eq!(
            decode(&rmp_serde::to_vec(&ok).unwrap(), 1 << 20).unwrap(),
            ok
        );
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0xc0);
        assert_eq!(
            decode(&deep, usize::MAX),
            Err(Error::invalid_arg("nested_too_deeply"))
        );
    }

    #[test]
    fn skip_passes_over_any_value() {
        let v = Value::List(vec![Value::atom("x"), Value::str("yy"), Value::Float(1.0)].into());
        let mut bytes = rmp_serde::to_vec(&v).unwrap();
        bytes.push(0x07);
        let mut r = Reader::new(&bytes);
        r.skip(1).unwrap();
        assert_eq!(r.u64().unwrap(), 7);
        assert!(r.at_end());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (seed % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = Reader::new(&bytes).value(&mut Budget::new(1 << 16), 1);
            let _ = Reader::new(&bytes).skip(1);
        }
    }
}
