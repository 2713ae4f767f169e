//! The frames between the gateway and the BEAM: a 4-byte big-endian length
//! (Erlang's `{:packet, 4}`), then one list in Erlang's external term format
//! (`crate::etf`: the BEAM reads it with `binary_to_term(bin, [:safe])` and
//! writes it with `term_to_binary/1`, in C, not in Elixir).
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

use crate::etf;

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

/// Encodes a list as one length-prefixed frame.
pub fn frame(items: &[Mp]) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&[0u8; 4]);
    buf.push(131);
    etf::list_header(&mut buf, items.len()).map_err(|e| e.0)?;
    for item in items {
        etf::write(&mut buf, item).map_err(|e| e.0)?;
    }
    if !items.is_empty() {
        etf::list_end(&mut buf);
    }
    let len = u32::try_from(buf.len() - 4).map_err(|_| "frame too large".to_owned())?;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

fn small_frame(items: &[Mp]) -> Vec<u8> {
    // Tags, ids and counts only: always encodable.
    frame(items).expect("a frame of strings and integers")
}

/// `["hello", port]`.
pub fn hello(port: u16) -> Vec<u8> {
    small_frame(&[Mp::from("hello"), Mp::from(port)])
}

/// `["call" | "stream", id, method, request, meta]`; an error when the
/// request holds what the BEAM has no term for (a non-finite float).
pub fn call(stream: bool, id: u64, method: &str, request: Mp, meta: Mp) -> Result<Vec<u8>, String> {
    let tag = if stream { "stream" } else { "call" };
    frame(&[Mp::from(tag), Mp::from(id), Mp::from(method), request, meta])
}

/// `["credit", id, n]`.
pub fn credit(id: u64, n: u64) -> Vec<u8> {
    small_frame(&[Mp::from("credit"), Mp::from(id), Mp::from(n)])
}

/// `["cancel", id]`.
pub fn cancel(id: u64) -> Vec<u8> {
    small_frame(&[Mp::from("cancel"), Mp::from(id)])
}

/// `["refused", n]`.
pub fn refused(n: u64) -> Vec<u8> {
    small_frame(&[Mp::from("refused"), Mp::from(n)])
}

/// Decodes the body of a frame from the BEAM. The error says what was wrong
/// (and the id, when one was readable, so the call can be failed).
pub fn decode(body: &[u8]) -> Result<Inbound, (Option<u64>, String)> {
    let mut r = etf::Reader::new(body, crate::codec::MAX_DEPTH).map_err(|e| (None, e.0))?;
    let n = r
        .list_header()
        .map_err(|_| (None, "a frame is a list".to_owned()))?;
    // The tag and the id first, so that a bad rest can still fail the call.
    let mut items = Vec::with_capacity(n);
    let mut id = None;
    for i in 0..n {
        let item = r.term().map_err(|e| (id, format!("bad frame: {e}")))?;
        if i == 1 {
            id = item.as_u64();
        }
        items.push(item);
    }
    if n > 0 {
        r.list_tail().map_err(|e| (id, format!("bad frame: {e}")))?;
    }
    if !r.is_empty() {
        return Err((id, "trailing bytes after the frame".into()));
    }
    let bad = |what: &str| (id, format!("bad {what} frame"));
    let tag = items
        .first()
        .and_then(Mp::as_str)
        .map(str::to_owned)
        .ok_or_else(|| bad("untagged"))?;
    let id_or = |what: &str| id.ok_or_else(|| bad(what));
    match (tag.as_str(), items.len()) {
        ("reply", 3) => Ok(Inbound::Reply {
            id: id_or("reply")?,
            response: items.swap_remove(2),
        }),
        ("item", 3) => Ok(Inbound::Item {
            id: id_or("item")?,
            message: items.swap_remove(2),
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
        _ => Err(bad(&tag)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(items: Vec<Mp>) -> Vec<u8> {
        frame(&items).unwrap()[4..].to_vec()
    }

    #[test]
    fn frames_are_length_prefixed_terms() {
        let f = credit(7, 1);
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let v = etf::decode(&f[4..]).unwrap();
        assert_eq!(v, Mp::Array(vec!["credit".into(), 7.into(), 1.into()]));
        // What the BEAM reads: :erlang.term_to_binary(["cancel", 3]).
        assert_eq!(
            &cancel(3)[4..],
            &[
                131, 108, 0, 0, 0, 2, 109, 0, 0, 0, 6, b'c', b'a', b'n', b'c', b'e', b'l', 97, 3,
                106
            ]
        );
        // A request the BEAM has no term for is refused here.
        let nan = Mp::Map(vec![(Mp::from("x"), Mp::F64(f64::NAN))]);
        assert!(call(false, 1, "Ping", nan, Mp::Map(vec![])).is_err());
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
        assert_eq!(decode(&[]).unwrap_err().0, None);
        assert_eq!(decode(&body(vec![1.into()])).unwrap_err().0, None);
        assert_eq!(decode(&[131, 97, 1]).unwrap_err().0, None);
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
        // A reply the gateway cannot read (a tuple) still names its call.
        let mut tuple = body(vec!["reply".into(), 9.into()]);
        tuple.truncate(tuple.len() - 1);
        tuple[5] = 3;
        tuple.extend_from_slice(&[104, 1, 97, 1, 106]);
        assert_eq!(decode(&tuple).unwrap_err().0, Some(9));
        assert!(decode(&body(vec!["nope".into(), 1.into()])).is_err());
        let mut trailing = body(vec!["end".into(), 1.into()]);
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        // Deep nesting is refused, not recursed into.
        let mut deep = vec![131u8];
        for _ in 0..10_000 {
            deep.extend_from_slice(&[108, 0, 0, 0, 1]);
        }
        assert!(decode(&deep).is_err());
    }
}
