//! The port program: one `Store`, requests in on stdin, replies out on stdout.
//!
//! The frame loop runs cheap commands inline and answers a whole burst of
//! pipelined requests with one write: replies are buffered while more frames
//! are already waiting, and flushed before the loop would block on a read.
//! Heavy commands (`Command::is_heavy`: listing, sweeping, export, import,
//! big batches) go to a few worker threads, so their replies may overtake or
//! trail others; the caller matches replies by id.
//!
//! Every request is stamped with the time it was read (the core applies
//! commands with the stamp and reads no clock).
//!
//! Bad frames get an error reply (with the request id when one is readable)
//! and the loop carries on; a panic inside an operation is caught and
//! answered as `{:error, {:internal_error, _}}`. End of input (the BEAM closed
//! the port or died) lets in-flight heavy work finish, then exits 0.
//!
//! Usage: `dspex_port [--max-frame-bytes N] [--workers N] [--max-value-bytes N]
//! [--max-name-bytes N] [--max-variables N] [--max-history N]
//! [--max-snapshot-bytes N]` (the store limits default as in `Limits`).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;

use dspex_core::limits::Limits;
use dspex_core::time::now_us;
use dspex_core::{Answer, Error, Reply, Stamped, Store};
use dspex_port::protocol::{
    decode_request, encode_reply, peek_id, Frame, FrameReader, Request, DEFAULT_MAX_FRAME,
};

/// Replies buffered past this size are written even if more frames wait.
const FLUSH_BYTES: usize = 256 << 10;

const USAGE: &str = "usage: dspex_port [--max-frame-bytes N] [--workers N] \
    [--max-value-bytes N] [--max-name-bytes N] [--max-variables N] [--max-history N] \
    [--max-snapshot-bytes N]";

struct Config {
    max_frame: usize,
    workers: usize,
    limits: Limits,
}

impl Config {
    fn from_args(mut args: impl Iterator<Item = String>) -> Result<Config, String> {
        let mut config = Config {
            max_frame: DEFAULT_MAX_FRAME,
            workers: 2,
            limits: Limits::default(),
        };
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let n: usize = value
                .parse()
                .map_err(|_| format!("{flag}: not a number: {value}"))?;
            match flag.as_str() {
                "--max-frame-bytes" => config.max_frame = n,
                "--workers" => config.workers = n.max(1),
                "--max-value-bytes" => config.limits.max_value_bytes = n,
                "--max-name-bytes" => config.limits.max_name_bytes = n,
                "--max-variables" => config.limits.max_variables = n,
                "--max-history" => config.limits.max_history = n,
                "--max-snapshot-bytes" => config.limits.max_snapshot_bytes = n,
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        Ok(config)
    }
}

/// stdout, shared by the frame loop and the workers; one frame (or batch of
/// frames) is written whole under the lock.
struct Output(Mutex<File>);

impl Output {
    fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let mut out = self.0.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(bytes)
    }
}

fn execute(store: &Store, command: Stamped) -> Result<Answer, Error> {
    let name = command.command.name();
    catch_unwind(AssertUnwindSafe(|| store.execute(command)))
        .unwrap_or_else(|_| Err(Error::Internal(format!("{name} panicked"))))
}

/// A heavy request, stamped when it was read.
type Job = (u64, Stamped);

fn start_workers(n: usize, store: &Arc<Store>, out: &Arc<Output>) -> io::Result<Workers> {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let handles = (0..n)
        .map(|i| {
            let (store, out, rx) = (store.clone(), out.clone(), rx.clone());
            thread::Builder::new()
                .name(format!("dspex_port_worker_{i}"))
                .spawn(move || work(&store, &out, &rx))
        })
        .collect::<io::Result<_>>()?;
    Ok(Workers { tx, handles })
}

struct Workers {
    tx: mpsc::Sender<Job>,
    handles: Vec<thread::JoinHandle<()>>,
}

fn work(store: &Store, out: &Output, rx: &Mutex<Receiver<Job>>) {
    let mut buf = Vec::new();
    loop {
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((id, command)) = job else { return };
        let reply = Reply {
            id: Some(id),
            result: execute(store, command),
        };
        buf.clear();
        encode_reply(&mut buf, &reply);
        if out.write(&buf).is_err() {
            return;
        }
    }
}

fn serve(config: &Config) -> io::Result<()> {
    let input = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let output = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let store = Arc::new(Store::with_limits(config.limits.clone()));
    let out = Arc::new(Output(Mutex::new(output)));
    let workers = start_workers(config.workers, &store, &out)?;
    let mut reader = FrameReader::new(input, config.max_frame);
    let mut batch: Vec<u8> = Vec::with_capacity(FLUSH_BYTES);
    loop {
        if !batch.is_empty() && (batch.len() >= FLUSH_BYTES || !reader.has_buffered_frame()) {
            out.write(&batch)?;
            batch.clear();
        }
        let reply = match reader.next_frame()? {
            None => break,
            Some(Frame::Body(body)) => match decode_request(body) {
                Ok(Request { id, command }) if command.is_heavy() => {
                    // The workers only stop when `tx` is dropped below.
                    let _ = workers.tx.send((id, command.stamped(now_us())));
                    continue;
                }
                Ok(Request { id, command }) => Reply {
                    id: Some(id),
                    result: execute(&store, command.stamped(now_us())),
                },
                Err(rejected) => rejected.into_reply(),
            },
            Some(Frame::Oversized { head, .. }) => Reply {
                id: peek_id(&head),
                result: Err(Error::TooLarge(reader.max_frame())),
            },
        };
        encode_reply(&mut batch, &reply);
    }
    out.write(&batch)?;
    drop(workers.tx);
    for handle in workers.handles {
        let _ = handle.join();
    }
    Ok(())
}

fn main() -> ExitCode {
    let config = match Config::from_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(why) => {
            eprintln!("dspex_port: {why}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match serve(&config) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our replies is gone: nothing left to do.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dspex_port: {e}");
            ExitCode::FAILURE
        }
    }
}
