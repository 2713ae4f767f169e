//! The frames between the gateway and the BEAM: a 4-byte big-endian length
//! (Erlang's `{:packet, 4}`), then one MessagePack array.
//!
//! Gateway -> BEAM:
//! - `["hello", port]` once listening (the bound port, for `--port 0`);
//! - `["call", id, method, request, meta]` a unary call;
//! - `["stream", id, method, request, meta]` a server-streaming call;
//! - `["credit", id, n]` the client took `n` more items of a stream;
//! - `["cancel", id]` the client went away (or its call was dropped);
//! - `["refused", n]` `n` calls were refused past `--max-in-flight`
//!   (`RESOURCE_EXHAUSTED`) since the last such frame.
//!
//! BEAM -> gateway:
//! - `["reply", id, response]` ends a unary call;
//! - `["item", id, message]` one item of a stream (at most the window
//!   unanswered by credit);
//! - `["end", id]` ends a stream with OK;
//! - `["status", id, code, message, error]` ends either with a gRPC status
//!   (`error`, the reason's name, goes to the `x-dspex-error` trailer).
//!
//! `id` is an unsigned integer chosen by the gateway. A frame that cannot be
//! read is reported and skipped; it never stops the loop.

use rmpv::Value as Mp;

/// The default largest frame read from the BEAM.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// A frame from the BEAM.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Reply {
        id: u64,
        response: Mp,
    },
    Item {
        id: u64,
        message: Mp,
    },
    End {
        id: u64,
    },
    Status {
        id: u64,
        code: i32,
        message: String,
        error: String,
    },
}

/// Encodes a MessagePack array as one length-prefixed frame.
pub fn frame(items: Vec<Mp>) -> Vec<u8> {
    let mut buf = vec![0u8; 4];
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut buf, &Mp::Array(items));
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf
}

/// `["hello", port]`.
pub fn hello(port: u16) -> Vec<u8> {
    frame(vec![Mp::from("hello"), Mp::from(port)])
}

/// `["call" | "stream", id, method, request, meta]`.
pub fn call(stream: bool, id: u64, method: &str, request: Mp, meta: Mp) -> Vec<u8> {
    let tag = if stream { "stream" } else { "call" };
    frame(vec![
        Mp::from(tag),
        Mp::from(id),
        Mp::from(method),
        request,
        meta,
    ])
}

/// `["credit", id, n]`.
pub fn credit(id: u64, n: u64) -> Vec<u8> {
    frame(vec![Mp::from("credit"), Mp::from(id), Mp::from(n)])
}

/// `["cancel", id]`.
pub fn cancel(id: u64) -> Vec<u8> {
    frame(vec![Mp::from("cancel"), Mp::from(id)])
}

/// `["refused", n]`.
pub fn refused(n: u64) -> Vec<u8> {
    frame(vec![Mp::from("refused"), Mp::from(n)])
}

/// Decodes the body of a frame from the BEAM. The error says what was wrong
/// (and the id, when one was readable, so the call can be failed).
pub fn decode(body: &[u8]) -> Result<Inbound, (Option<u64>, String)> {
    let mut slice = body;
    let value = rmpv::decode::read_value_with_max_depth(&mut slice, crate::codec::MAX_DEPTH)
        .map_err(|e| (None, format!("not MessagePack: {e}")))?;
    if !slice.is_empty() {
        return Err((None, "trailing bytes after the frame".into()));
    }
    let Mp::Array(items) = value else {
        return Err((None, "a frame is an array".into()));
    };
    let id = items.get(1).and_then(Mp::as_u64);
    let bad = |what: &str| (id, format!("bad {what} frame"));
    let tag = items
        .first()
        .and_then(Mp::as_str)
        .ok_or_else(|| bad("untagged"))?;
    let id_or = |what: &str| id.ok_or_else(|| bad(what));
    match (tag, items.len()) {
        ("reply", 3) => Ok(Inbound::Reply {
            id: id_or("reply")?,
            response: items[2].clone(),
        }),
        ("item", 3) => Ok(Inbound::Item {
            id: id_or("item")?,
            message: items[2].clone(),
        }),
        ("end", 2) => Ok(Inbound::End { id: id_or("end")? }),
        ("status", 5) => {
            let code = items[2]
                .as_i64()
                .and_then(|c| i32::try_from(c).ok())
                .ok_or_else(|| bad("status"))?;
            Ok(Inbound::Status {
                id: id_or("status")?,
                code,
                message: items[3].as_str().unwrap_or_default().to_owned(),
                error: items[4].as_str().unwrap_or_default().to_owned(),
            })
        }
        _ => Err(bad(tag)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(items: Vec<Mp>) -> Vec<u8> {
        frame(items)[4..].to_vec()
    }

    #[test]
    fn frames_are_length_prefixed() {
        let f = credit(7, 1);
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let v = rmpv::decode::read_value(&mut &f[4..]).unwrap();
        assert_eq!(v, Mp::Array(vec!["credit".into(), 7.into(), 1.into()]));
    }

    #[test]
    fn decodes_each_inbound_frame() {
        assert_eq!(
            decode(&body(vec!["reply".into(), 3.into(), Mp::Map(vec![])])),
            Ok(Inbound::Reply {
                id: 3,
                response: Mp::Map(vec![])
            })
        );
        assert_eq!(
            decode(&body(vec!["end".into(), 4.into()])),
            Ok(Inbound::End { id: 4 })
        );
        assert_eq!(
            decode(&body(vec![
                "status".into(),
                5.into(),
                5.into(),
                "variable not found".into(),
                "not_found".into()
            ])),
            Ok(Inbound::Status {
                id: 5,
                code: 5,
                message: "variable not found".into(),
                error: "not_found".into()
            })
        );
    }

    #[test]
    fn bad_frames_are_errors_with_the_id_when_readable() {
        assert_eq!(decode(&[0xc1]).unwrap_err().0, None);
        assert_eq!(decode(&body(vec![1.into()])).unwrap_err().0, None);
        assert_eq!(
            decode(&body(vec!["reply".into(), 9.into()])).unwrap_err().0,
            Some(9)
        );
        assert_eq!(
            decode(&body(vec![
                "status".into(),
                9.into(),
                "x".into(),
                "".into(),
                "".into()
            ]))
            .unwrap_err()
            .0,
            Some(9)
        );
        assert!(decode(&body(vec!["nope".into(), 1.into()])).is_err());
        let mut trailing = body(vec!["end".into(), 1.into()]);
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        // Deep nesting is refused, not recursed into.
        let deep = vec![0x91u8; 10_000];
        assert!(decode(&deep).is_err());
    }
}
