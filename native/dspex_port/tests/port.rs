//! Spawns the port binary and speaks frames to it, as the BEAM does.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command as Process, Stdio};

use dspex_core::{Command, Value};
use dspex_port::protocol::encode_request;

struct Port {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
}

impl Port {
    fn spawn(args: &[&str]) -> Port {
        let mut child = Process::new(env!("CARGO_BIN_EXE_dspex_port"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn dspex_port");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        Port {
            child,
            stdin,
            stdout,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    fn send_body(&mut self, body: &[u8]) {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        self.send_raw(&frame);
    }

    fn send(&mut self, id: u64, command: &Command) {
        let mut frame = Vec::new();
        encode_request(&mut frame, id, command).unwrap();
        self.send_raw(&frame);
    }

    fn recv(&mut self) -> (Option<u64>, Value) {
        let mut header = [0; 4];
        self.stdout.read_exact(&mut header).unwrap();
        let mut body = vec![0; u32::from_be_bytes(header) as usize];
        self.stdout.read_exact(&mut body).unwrap();
        rmp_serde::from_slice(&body).unwrap()
    }

    fn call(&mut self, id: u64, command: &Command) -> Value {
        self.send(id, command);
        let (got, term) = self.recv();
        assert_eq!(got, Some(id));
        term
    }

    /// Closes stdin and waits for a clean exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

fn ok(v: Value) -> Value {
    Value::tagged("ok", v)
}

fn error_kind(term: &Value) -> Option<&str> {
    match term {
        Value::Tuple(xs) if xs.len() == 2 && xs[0] == Value::atom("error") => match &xs[1] {
            Value::Atom(kind) => Some(kind),
            Value::Tuple(r) => r[0].as_text(),
            _ => None,
        },
        _ => None,
    }
}

fn create(session: &str) -> Command {
    Command::SessionCreate(dspex_core::command::SessionCreate {
        session: session.into(),
        ttl_ms: Value::Nil,
        max_history: Value::Nil,
        metadata: Value::Nil,
        rate_limit: Value::Nil,
        audit_capacity: Value::Nil,
    })
}

fn register_int(session: &str, name: &str) -> Command {
    Command::VarRegister(dspex_core::command::VarRegister {
        session: session.into(),
        name: Value::atom(name),
        var_type: Value::atom("integer"),
        initial: Value::Int(0),
        constraints: Value::Nil,
        metadata: Value::Nil,
        description: None,
        access_rules: Value::Nil,
        actor: Default::default(),
    })
}

fn set(session: &str, name: &str, n: i64) -> Command {
    Command::VarSet(dspex_core::command::VarSet {
        session: session.into(),
        ident: Value::atom(name),
        value: Value::Int(n),
        metadata: Value::Nil,
        expected_version: None,
        actor: Default::default(),
    })
}

fn get_value(session: &str, name: &str) -> Command {
    Command::VarGetValue(dspex_core::command::VarGetValue {
        session: session.into(),
        ident: Value::atom(name),
        actor: Default::default(),
    })
}

#[test]
fn serves_sessions_and_variables() {
    let mut port = Port::spawn(&[]);
    assert_eq!(port.call(1, &create("s")), Value::atom("ok"));
    assert!(matches!(
        port.call(2, &register_int("s", "n")),
        Value::Tuple(_)
    ));
    assert_eq!(port.call(3, &set("s", "n", 5)), ok(Value::Int(1)));
    assert_eq!(port.call(4, &get_value("s", "n")), ok(Value::Int(5)));
    assert_eq!(
        error_kind(&port.call(5, &get_value("nope", "n"))),
        Some("session_not_found")
    );
    let exported = port.call(
        6,
        &Command::SessionExport(dspex_core::command::SessionExport {
            session: "s".into(),
        }),
    );
    let Value::Tuple(parts) = exported else {
        panic!("{exported}")
    };
    let snapshot = match &parts[1] {
        Value::Bytes(b) => b.to_vec(),
        Value::Str(s) => s.as_bytes().to_vec(),
        other => panic!("{other}"),
    };
    let imported = port.call(
        7,
        &Command::SessionImport(dspex_core::command::SessionImport {
            snapshot,
            session: Some("copy".into()),
        }),
    );
    assert_eq!(imported, ok(Value::str("copy")));
    assert_eq!(port.call(8, &get_value("copy", "n")), ok(Value::Int(5)));
    port.finish();
}

#[test]
fn pipelined_requests_are_all_answered_by_id() {
    let mut port = Port::spawn(&[]);
    port.call(1, &create("s"));
    port.call(2, &register_int("s", "n"));
    let n = 5_000u64;
    let mut frames = Vec::new();
    for id in 100..100 + n {
        let cmd = if id % 2 == 0 {
            set("s", "n", id as i64)
        } else if id % 7 == 0 {
            Command::SessionList(dspex_core::command::SessionList {})
        } else {
            get_value("s", "n")
        };
        encode_request(&mut frames, id, &cmd).unwrap();
    }
    // Write from another thread: the port answers while we still send.
    let mut stdin = port.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&frames).unwrap();
        stdin
    });
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (id, term) = port.recv();
        let id = id.expect("every reply has an id");
        assert!(error_kind(&term).is_none(), "{id}: {term}");
        assert!(seen.insert(id, term).is_none(), "duplicate reply {id}");
    }
    assert_eq!(seen.len() as u64, n);
    port.stdin = Some(writer.join().unwrap());
    port.finish();
}

#[test]
fn bad_frames_get_error_replies_and_the_port_lives_on() {
    use rmpv::Value as M;
    let mut port = Port::spawn(&["--max-frame-bytes", "1024"]);
    let encode = |v: &M| {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    };

    // Not MessagePack at all: no id to answer to.
    port.send_body(b"\xc1\xc1 garbage");
    let (id, term) = port.recv();
    assert_eq!((id, error_kind(&term)), (None, Some("bad_request")));

    // An empty frame.
    port.send_body(b"");
    let (id, term) = port.recv();
    assert_eq!((id, error_kind(&term)), (None, Some("bad_request")));

    // An unknown command keeps its id.
    port.send_body(&encode(&M::Array(vec![
        M::from(11),
        M::Map(vec![(M::from("format_disk"), M::Map(vec![]))]),
    ])));
    let (id, term) = port.recv();
    assert_eq!((id, error_kind(&term)), (Some(11), Some("bad_request")));
    assert_eq!(
        term,
        Value::tagged(
            "error",
            Value::tagged("bad_request", Value::str("unknown command `format_disk`"))
        )
    );

    // A body cut short keeps its id.
    let mut whole = Vec::new();
    encode_request(&mut whole, 12, &create("t")).unwrap();
    port.send_body(&whole[4..whole.len() - 2]);
    let (id, term) = port.recv();
    assert_eq!((id, error_kind(&term)), (Some(12), Some("bad_request")));

    // Wrong argument types keep their id.
    port.send_body(&encode(&M::Array(vec![
        M::from(13),
        M::Map(vec![(M::from("session_create"), M::from(42))]),
    ])));
    let (id, term) = port.recv();
    assert_eq!((id, error_kind(&term)), (Some(13), Some("bad_request")));

    // Oversized: skipped without being buffered, answered by id.
    let big = Command::SessionCreate(dspex_core::command::SessionCreate {
        session: "x".into(),
        ttl_ms: Value::Nil,
        max_history: Value::Nil,
        metadata: Value::str(&"m".repeat(4000)),
        rate_limit: Value::Nil,
        audit_capacity: Value::Nil,
    });
    port.send(14, &big);
    let (id, term) = port.recv();
    assert_eq!(
        (id, term),
        (
            Some(14),
            Value::tagged("error", Value::tagged("too_large", Value::Int(1024)))
        )
    );

    // And it still serves.
    assert_eq!(port.call(15, &create("alive")), Value::atom("ok"));

    // A frame cut off by the end of input: a clean exit.
    port.send_raw(&[0, 0, 0, 50, 0x92, 0x01]);
    port.finish();
}

#[test]
fn limits_come_from_the_command_line() {
    let mut port = Port::spawn(&["--max-value-bytes", "64", "--max-history", "60"]);
    assert_eq!(port.call(1, &create("s")), Value::atom("ok"));
    port.call(2, &register_int("s", "n"));
    let big = Command::VarSet(dspex_core::command::VarSet {
        session: "s".into(),
        ident: Value::atom("n"),
        value: Value::str(&"x".repeat(100)),
        metadata: Value::Nil,
        expected_version: None,
        actor: Default::default(),
    });
    assert_eq!(
        port.call(3, &big),
        Value::tagged("error", Value::tagged("too_large", Value::Int(64)))
    );
    let deep_history = Command::SessionCreate(dspex_core::command::SessionCreate {
        session: "h".into(),
        ttl_ms: Value::Nil,
        max_history: Value::Int(61),
        metadata: Value::Nil,
        rate_limit: Value::Nil,
        audit_capacity: Value::Nil,
    });
    assert_eq!(
        error_kind(&port.call(4, &deep_history)),
        Some("invalid_argument")
    );
    port.finish();
}

#[test]
fn exits_cleanly_on_eof() {
    let port = Port::spawn(&[]);
    port.finish();
}

#[test]
fn rejects_bad_options() {
    let status = Process::new(env!("CARGO_BIN_EXE_dspex_port"))
        .args(["--workers"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}
