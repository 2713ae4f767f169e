//! The port protocol: length-prefixed frames (4-byte big-endian length, as
//! Erlang's `{:packet, 4}`), each carrying one MessagePack message.
//!
//! - request: `[id, command]`, `id` an unsigned integer chosen by the caller,
//!   `command` a [`Command`] with its arguments by name:
//!   `{"var_get": {"session": s, "ident": i, "actor": {"principal": p}}}`.
//!   Arguments by position (an array) are refused: the wire form never
//!   depends on the order of a struct's fields.
//! - reply: `[id, term]`, `term` the Elixir result (`:ok`, `{:ok, value}`,
//!   `{:error, reason}`), `id` `nil` when it could not be read from the request.
//!
//! Atoms travel as MessagePack ext type 1, tuples as ext type 2 (see
//! `dspex_core::value`).
//!
//! # Invariants
//! - [`decode_request`] never panics, whatever the bytes; it recovers the id
//!   whenever the frame starts with a readable `[id, ...`.
//! - [`FrameReader`] never buffers more than one frame of at most
//!   `max_frame` bytes; a longer frame is skipped without being held in memory
//!   and reported as [`Frame::Oversized`] with its first bytes, so its id can
//!   still be answered.
//! - [`encode_reply`] always appends exactly one well-formed frame.

use std::io::{self, Read};

use dspex_core::{Command, Error, Reply};
use serde::Deserialize;

/// Default largest frame accepted: 64 MiB.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;
/// Deepest MessagePack nesting a request may have (values allow 64 inside).
const MAX_DECODE_DEPTH: usize = 96;
/// Bytes kept from the start of an oversized frame, enough for `[id, ...`.
const HEAD_BYTES: usize = 16;
/// Read buffer size, and the size it shrinks back to after a large frame.
const BUFFER_BYTES: usize = 64 << 10;

/// A decoded request.
#[derive(Debug, PartialEq)]
pub struct Request {
    pub id: u64,
    pub command: Command,
}

/// A request that could not be decoded, with its id when one was readable.
#[derive(Debug, PartialEq)]
pub struct Rejected {
    pub id: Option<u64>,
    pub error: Error,
}

impl Rejected {
    pub fn into_reply(self) -> Reply {
        Reply {
            id: self.id,
            result: Err(self.error),
        }
    }
}

fn bad(id: Option<u64>, why: impl Into<String>) -> Rejected {
    Rejected {
        id,
        error: Error::BadRequest(why.into()),
    }
}

/// Decodes one frame body into a request.
pub fn decode_request(body: &[u8]) -> Result<Request, Rejected> {
    let mut rd = body;
    let len = rmp::decode::read_array_len(&mut rd)
        .map_err(|_| bad(None, "expected a request [id, command]"))?;
    if len == 0 {
        return Err(bad(None, "expected a request [id, command]"));
    }
    let id: u64 = rmp::decode::read_int(&mut rd)
        .map_err(|_| bad(None, "the request id must be an unsigned integer"))?;
    if len != 2 {
        return Err(bad(Some(id), "expected a request [id, command]"));
    }
    if !arguments_by_name(rd) {
        return Err(bad(
            Some(id),
            "expected a command {name => %{argument => value}}",
        ));
    }
    let mut de = rmp_serde::Deserializer::new(&mut rd);
    de.set_max_depth(MAX_DECODE_DEPTH);
    let command = Command::deserialize(&mut de).map_err(|e| bad(Some(id), describe(&e)))?;
    drop(de);
    if !rd.is_empty() {
        return Err(bad(Some(id), "trailing bytes after the command"));
    }
    Ok(Request { id, command })
}

/// Is `command` a one-entry map whose value is a map (arguments by name)?
fn arguments_by_name(mut rd: &[u8]) -> bool {
    use rmp::Marker;
    if !matches!(rmp::decode::read_map_len(&mut rd), Ok(1)) {
        return false;
    }
    let name_len = match rmp::decode::read_marker(&mut rd) {
        Ok(Marker::FixStr(n)) => n as usize,
        Ok(Marker::Str8 | Marker::Bin8) => match rd.split_first() {
            Some((n, rest)) => {
                rd = rest;
                *n as usize
            }
            None => return false,
        },
        _ => return false,
    };
    let Some(rest) = rd.get(name_len..) else {
        return false;
    };
    matches!(
        rmp::decode::read_marker(&mut &rest[..]),
        Ok(Marker::FixMap(_) | Marker::Map16 | Marker::Map32)
    )
}

/// A serde error, phrased for the protocol: unknown variants are unknown
/// commands, and the list of every known command is left out.
fn describe(e: &rmp_serde::decode::Error) -> String {
    let text = e.to_string();
    let text = text.split(", expected one of").next().unwrap_or(&text);
    match text.strip_prefix("unknown variant ") {
        Some(name) => format!("unknown command {name}"),
        None => text.to_string(),
    }
}

/// The id at the start of a request, if the bytes begin with `[id, ...`.
pub fn peek_id(head: &[u8]) -> Option<u64> {
    let mut rd = head;
    match rmp::decode::read_array_len(&mut rd) {
        Ok(n) if n > 0 => rmp::decode::read_int(&mut rd).ok(),
        _ => None,
    }
}

/// Appends `reply` to `out` as one frame.
pub fn encode_reply(out: &mut Vec<u8>, reply: &Reply) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = rmp_serde::encode::write(out, reply) {
        out.truncate(at + 4);
        let fallback = Reply {
            id: reply.id,
            result: Err(Error::Internal(format!("reply not encodable: {e}"))),
        };
        // A short string and an id always encode.
        let _ = rmp_serde::encode::write(out, &fallback);
    }
    let len = out.len() - at - 4;
    match u32::try_from(len) {
        Ok(n) => out[at..at + 4].copy_from_slice(&n.to_be_bytes()),
        Err(_) => {
            out.truncate(at);
            let too_large = Reply {
                id: reply.id,
                result: Err(Error::TooLarge(u32::MAX as usize)),
            };
            encode_reply(out, &too_large);
        }
    }
}

/// Appends a request frame: the client side of the protocol (tests, tools).
/// Fails, appending nothing, on a value nested too deeply to encode.
pub fn encode_request(
    out: &mut Vec<u8>,
    id: u64,
    command: &Command,
) -> Result<(), rmp_serde::encode::Error> {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let written = rmp_serde::encode::write_named(out, &(id, command));
    let len = u32::try_from(out.len() - at - 4);
    match (written, len) {
        (Ok(()), Ok(len)) => {
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        (Err(e), _) => {
            out.truncate(at);
            Err(e)
        }
        (Ok(()), Err(_)) => {
            out.truncate(at);
            Err(rmp_serde::encode::Error::Syntax("frame too large".into()))
        }
    }
}

/// What [`FrameReader::next_frame`] found.
#[derive(Debug, PartialEq)]
pub enum Frame<'a> {
    /// A whole frame's body.
    Body(&'a [u8]),
    /// A frame longer than the limit, already skipped; `head` holds its
    /// first bytes.
    Oversized { len: usize, head: Vec<u8> },
}

/// Splits a byte stream into frames, reading as much as is available at a
/// time so a burst of pipelined requests costs one read.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, max_frame: usize) -> Self {
        FrameReader {
            inner,
            buf: vec![0; BUFFER_BYTES],
            start: 0,
            end: 0,
            max_frame,
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// True when the next frame (or an oversized frame's header) is already
    /// buffered, so `next_frame` will not block.
    pub fn has_buffered_frame(&self) -> bool {
        let avail = &self.buf[self.start..self.end];
        match avail.get(..4) {
            Some(header) => {
                let len = frame_len(header);
                len > self.max_frame || avail.len() - 4 >= len
            }
            None => false,
        }
    }

    /// The next frame; `None` at end of input (a frame cut short by the end
    /// of input is dropped: there is nobody left to answer).
    pub fn next_frame(&mut self) -> io::Result<Option<Frame<'_>>> {
        if self.start == self.end && self.buf.len() > BUFFER_BYTES {
            self.buf = vec![0; BUFFER_BYTES];
            self.start = 0;
            self.end = 0;
        }
        if !self.fill(4)? {
            return Ok(None);
        }
        let len = frame_len(&self.buf[self.start..]);
        if len > self.max_frame {
            self.start += 4;
            let keep = len.min(HEAD_BYTES);
            if !self.fill(keep)? {
                return Ok(None);
            }
            let head = self.buf[self.start..self.start + keep].to_vec();
            if !self.skip(len)? {
                return Ok(None);
            }
            return Ok(Some(Frame::Oversized { len, head }));
        }
        if !self.fill(4 + len)? {
            return Ok(None);
        }
        let body = self.start + 4..self.start + 4 + len;
        self.start = body.end;
        Ok(Some(Frame::Body(&self.buf[body])))
    }

    /// Ensures `n` bytes are buffered; false if the input ends first.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.end - self.start < n {
            if self.start + n > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if n > self.buf.len() {
                    let grown = n.max(self.buf.len().saturating_mul(2));
                    self.buf.resize(grown.min(self.max_frame + 4).max(n), 0);
                }
            }
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(read) => self.end += read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Discards `n` bytes; false if the input ends first.
    fn skip(&mut self, mut n: usize) -> io::Result<bool> {
        loop {
            let buffered = (self.end - self.start).min(n);
            self.start += buffered;
            n -= buffered;
            if n == 0 {
                return Ok(true);
            }
            self.start = 0;
            self.end = 0;
            match self.inner.read(&mut self.buf[..]) {
                Ok(0) => return Ok(false),
                Ok(read) => self.end = read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn frame_len(header: &[u8]) -> usize {
    u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use dspex_core::{Answer, Value};
    use proptest::prelude::*;

    fn get_value(id: &str) -> Command {
        Command::VarGetValue(dspex_core::command::VarGetValue {
            session: "s".into(),
            ident: Value::atom(id),
            actor: Default::default(),
        })
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    fn body_of(id: u64, command: &Command) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request(&mut out, id, command).unwrap();
        out.split_off(4)
    }

    fn msgpack(v: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn request_round_trip() {
        let cmd = get_value("t");
        let body = body_of(42, &cmd);
        assert_eq!(
            decode_request(&body),
            Ok(Request {
                id: 42,
                command: cmd
            })
        );
    }

    #[test]
    fn the_id_survives_a_bad_command() {
        use rmpv::Value as M;
        let unknown = msgpack(&M::Array(vec![
            M::from(7),
            M::Map(vec![(M::from("launch_rockets"), M::Map(vec![]))]),
        ]));
        let rejected = decode_request(&unknown).unwrap_err();
        assert_eq!(rejected.id, Some(7));
        assert_eq!(
            rejected.error,
            Error::BadRequest("unknown command `launch_rockets`".into())
        );
        let mut truncated = body_of(8, &get_value("t"));
        truncated.truncate(truncated.len() - 3);
        assert_eq!(decode_request(&truncated).unwrap_err().id, Some(8));
        let mut trailing = body_of(9, &get_value("t"));
        trailing.push(0xc0);
        assert_eq!(decode_request(&trailing).unwrap_err().id, Some(9));
        let missing_field = msgpack(&M::Array(vec![
            M::from(10),
            M::Map(vec![(M::from("var_get"), M::Map(vec![]))]),
        ]));
        assert_eq!(decode_request(&missing_field).unwrap_err().id, Some(10));
        for garbage in [&b""[..], b"\xc1", b"\x92\xa1x", b"\x90"] {
            assert_eq!(decode_request(garbage).unwrap_err().id, None);
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut body = vec![0x92, 0x01, 0x81, 0xad];
        body.extend_from_slice(b"var_get_value");
        body.extend_from_slice(&[0x91; 100_000]);
        assert_eq!(decode_request(&body).unwrap_err().id, Some(1));
    }

    #[test]
    fn replies_are_framed() {
        let mut out = Vec::new();
        encode_reply(
            &mut out,
            &Reply {
                id: Some(3),
                result: Ok(Answer::Value(Value::Int(5))),
            },
        );
        encode_reply(
            &mut out,
            &Reply {
                id: None,
                result: Err(Error::BadRequest("x".into())),
            },
        );
        let mut reader = FrameReader::new(&out[..], DEFAULT_MAX_FRAME);
        let Some(Frame::Body(b)) = reader.next_frame().unwrap() else {
            panic!()
        };
        let (id, term): (Option<u64>, Value) = rmp_serde::from_slice(b).unwrap();
        assert_eq!(id, Some(3));
        assert_eq!(term, Value::tagged("ok", Value::Int(5)));
        let Some(Frame::Body(b)) = reader.next_frame().unwrap() else {
            panic!()
        };
        let (id, _): (Option<u64>, Value) = rmp_serde::from_slice(b).unwrap();
        assert_eq!(id, None);
        assert_eq!(reader.next_frame().unwrap(), None);
    }

    #[test]
    fn frames_split_across_reads() {
        /// Hands out one byte per read.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self.0.split_first() {
                    Some((b, rest)) if !buf.is_empty() => {
                        buf[0] = *b;
                        self.0 = rest;
                        Ok(1)
                    }
                    _ => Ok(0),
                }
            }
        }
        let mut stream = frame(b"abc");
        stream.extend(frame(b""));
        stream.extend(frame(&[7; 100_000]));
        let mut reader = FrameReader::new(Trickle(&stream), DEFAULT_MAX_FRAME);
        assert_eq!(reader.next_frame().unwrap(), Some(Frame::Body(b"abc")));
        assert_eq!(reader.next_frame().unwrap(), Some(Frame::Body(b"")));
        assert_eq!(
            reader.next_frame().unwrap(),
            Some(Frame::Body(&[7; 100_000][..]))
        );
        assert_eq!(reader.next_frame().unwrap(), None);
    }

    #[test]
    fn oversized_frames_are_skipped_with_their_head() {
        let big = body_of(77, &get_value(&"x".repeat(200)));
        let mut stream = frame(&big);
        stream.extend(frame(b"next"));
        let mut reader = FrameReader::new(&stream[..], 100);
        assert!(!reader.has_buffered_frame());
        let Some(Frame::Oversized { len, head }) = reader.next_frame().unwrap() else {
            panic!()
        };
        assert_eq!(len, big.len());
        assert_eq!(peek_id(&head), Some(77));
        assert!(reader.has_buffered_frame());
        assert_eq!(reader.next_frame().unwrap(), Some(Frame::Body(b"next")));
    }

    #[test]
    fn a_stream_cut_mid_frame_ends_cleanly() {
        let mut stream = frame(b"whole");
        stream.extend_from_slice(&[0, 0, 0, 9, 1, 2]);
        let mut reader = FrameReader::new(&stream[..], DEFAULT_MAX_FRAME);
        assert_eq!(reader.next_frame().unwrap(), Some(Frame::Body(b"whole")));
        assert_eq!(reader.next_frame().unwrap(), None);
        let mut reader = FrameReader::new(&[0u8, 0][..], DEFAULT_MAX_FRAME);
        assert_eq!(reader.next_frame().unwrap(), None);
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
            let _ = peek_id(&bytes);
        }

        #[test]
        fn random_bodies_after_a_valid_prefix_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut body = vec![0x92, 0x05, 0x81, 0xa7];
            body.extend_from_slice(b"var_set");
            body.extend_from_slice(&tail);
            if let Err(rejected) = decode_request(&body) {
                prop_assert_eq!(rejected.id, Some(5));
            }
        }

        #[test]
        fn random_streams_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            max in 0usize..600,
        ) {
            let mut reader = FrameReader::new(&bytes[..], max);
            let mut frames = 0;
            while let Some(frame) = reader.next_frame().unwrap() {
                if let Frame::Body(b) = frame {
                    prop_assert!(b.len() <= max);
                    let _ = decode_request(b);
                }
                frames += 1;
                prop_assert!(frames <= bytes.len() / 4 + 1);
            }
        }
    }
}
