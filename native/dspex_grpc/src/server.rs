//! The tonic service and the two loops that link it to the BEAM.
//!
//! Every method of `BridgeService` is served by one generic handler: the
//! request bytes are decoded against the method's input descriptor
//! (`prost-reflect`; garbage is `INVALID_ARGUMENT` here and never reaches
//! the BEAM), turned into MessagePack (`codec`) and sent as a `call` or
//! `stream` frame; the reply frame is encoded against the output descriptor.
//! A call whose client goes away sends `cancel`. Pending calls live in one
//! map keyed by request id; if the BEAM goes away (stdin closes) the process
//! exits and the clients see UNAVAILABLE.
//!
//! Streams are flow-controlled by credit: the BEAM sends at most `window`
//! items ahead of the client, the gateway sends `credit` as the client takes
//! them, so nothing queues without bound here (the BEAM coalesces what waits).
//!
//! Limits: `--max-message-bytes` (each way), `--max-concurrency` (calls in
//! flight per connection), `--max-streams` (HTTP/2 streams per connection),
//! `--max-in-flight` (unary calls sent to the BEAM and not yet answered, over
//! all connections: past it a call is `RESOURCE_EXHAUSTED` here, at once, so
//! the BEAM's gateway process never has more than that many calls waiting in
//! its mailbox however many clients connect). Those refusals are counted
//! and reported to the BEAM as `["refused", n]` at most every
//! [`REFUSED_REPORT_EVERY`], so the bridge counts them without a frame per
//! refusal.

// tonic's `Status` is the error of every gRPC path; boxing it would only add
// conversions at each tonic boundary.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use rmpv::Value as Mp;
use tokio::sync::{mpsc, oneshot};
use tonic::body::BoxBody;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{empty_body, http, BoxFuture, Service};
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::server::{NamedService, ServerStreamingService, UnaryService};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Code, Status};

use crate::codec::{message_to_mp, mp_to_message};
use crate::link::{self, Inbound};

pub const USAGE: &str = "usage: dspex_grpc [--ip A] [--port N] [--tls-cert PEM --tls-key PEM] \
    [--max-message-bytes N] [--max-concurrency N] [--max-streams N] [--stream-window N] \
    [--max-in-flight N] [--max-frame-bytes N] [--threads N]";

/// The process's options.
#[derive(Debug, Clone)]
pub struct Config {
    pub ip: IpAddr,
    pub port: u16,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub max_message_bytes: usize,
    pub max_concurrency: usize,
    pub max_streams: u32,
    pub stream_window: usize,
    pub max_in_flight: usize,
    pub max_frame_bytes: usize,
    pub threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ip: IpAddr::from([127, 0, 0, 1]),
            port: 50051,
            tls_cert: None,
            tls_key: None,
            max_message_bytes: 4 << 20,
            max_concurrency: 64,
            max_streams: 128,
            stream_window: 16,
            max_in_flight: 1024,
            max_frame_bytes: link::DEFAULT_MAX_FRAME,
            threads: 1,
        }
    }
}

impl Config {
    pub fn from_args(mut args: impl Iterator<Item = String>) -> Result<Config, String> {
        let mut c = Config::default();
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = || -> Result<usize, String> {
                value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{flag}: not a positive number: {value}"))
            };
            match flag.as_str() {
                "--ip" => {
                    c.ip = value
                        .parse()
                        .map_err(|_| format!("--ip: bad address {value}"))?
                }
                "--port" => {
                    c.port = value
                        .parse()
                        .map_err(|_| format!("--port: bad port {value}"))?
                }
                "--tls-cert" => c.tls_cert = Some(value),
                "--tls-key" => c.tls_key = Some(value),
                "--max-message-bytes" => c.max_message_bytes = num()?,
                "--max-concurrency" => c.max_concurrency = num()?,
                "--max-streams" => {
                    c.max_streams = u32::try_from(num()?).map_err(|_| "--max-streams too big")?
                }
                "--stream-window" => c.stream_window = num()?,
                "--max-in-flight" => c.max_in_flight = num()?,
                "--max-frame-bytes" => c.max_frame_bytes = num()?,
                "--threads" => c.threads = num()?,
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        if c.tls_cert.is_some() != c.tls_key.is_some() {
            return Err("--tls-cert and --tls-key go together".into());
        }
        Ok(c)
    }
}

/// One method of the service.
#[derive(Clone)]
struct Method {
    name: Arc<str>,
    input: MessageDescriptor,
    output: MessageDescriptor,
    streaming: bool,
}

enum Pending {
    Unary(oneshot::Sender<Result<Bytes, Status>>, MessageDescriptor),
    Stream(mpsc::Sender<Result<Bytes, Status>>, MessageDescriptor),
}

struct Shared {
    methods: HashMap<String, Method>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    out: mpsc::UnboundedSender<Vec<u8>>,
    max_message_bytes: usize,
    stream_window: usize,
    in_flight: InFlight,
}

/// How often refusals past `--max-in-flight` are reported (when there were any).
pub const REFUSED_REPORT_EVERY: Duration = Duration::from_millis(250);

/// Unary calls sent to the BEAM and not yet answered, bounded.
struct InFlight {
    count: AtomicUsize,
    max: usize,
    /// Calls refused since the last report.
    refused: AtomicU64,
}

/// One place in [`InFlight`], given back when dropped (answered, failed or
/// abandoned by its client).
struct Slot<'a>(&'a InFlight);

impl InFlight {
    fn new(max: usize) -> Self {
        InFlight {
            count: AtomicUsize::new(0),
            max,
            refused: AtomicU64::new(0),
        }
    }

    fn take(&self) -> Option<Slot<'_>> {
        if self.count.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.refused.fetch_add(1, Ordering::Relaxed);
            None
        } else {
            Some(Slot(self))
        }
    }
}

impl InFlight {
    /// The refusals since the last call, and zero from now.
    fn take_refused(&self) -> u64 {
        self.refused.swap(0, Ordering::Relaxed)
    }
}

/// Sends `["refused", n]` every [`REFUSED_REPORT_EVERY`] there were refusals.
async fn report_refusals(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(REFUSED_REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let n = shared.in_flight.take_refused();
        if n > 0 && shared.send(link::refused(n)).is_err() {
            return;
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, frame: Vec<u8>) -> Result<(), Status> {
        self.out
            .send(frame)
            .map_err(|_| Status::unavailable("the bridge is not running"))
    }
}

/// Runs the gateway until stdin closes.
///
/// `--threads 1` (the default) runs everything on one thread: the gRPC
/// connections, the codec and the two pipe loops, so a call costs no wakeup
/// of another thread between its request and its answer (at a few thousand
/// calls a second the gateway needs a fraction of one core; crossing threads
/// was most of its cost). More threads use tokio's multi-thread runtime.
pub fn run(config: Config) -> Result<(), String> {
    let runtime = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<(), String> {
    let pool = crate::descriptor_pool();
    let service = pool
        .get_service_by_name(crate::SERVICE)
        .ok_or("the service is missing from the descriptor set")?;
    let methods = service
        .methods()
        .map(|m| {
            let path = format!("/{}/{}", crate::SERVICE, m.name());
            let method = Method {
                name: m.name().into(),
                input: m.input(),
                output: m.output(),
                streaming: m.is_server_streaming(),
            };
            (path, method)
        })
        .collect();

    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        methods,
        pending: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        out: out_tx,
        max_message_bytes: config.max_message_bytes,
        stream_window: config.stream_window,
        in_flight: InFlight::new(config.max_in_flight),
    });

    let listener = tokio::net::TcpListener::bind(SocketAddr::new(config.ip, config.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", config.ip, config.port))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();

    let mut builder = Server::builder()
        .concurrency_limit_per_connection(config.max_concurrency)
        .max_concurrent_streams(config.max_streams)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let cert = std::fs::read(cert).map_err(|e| format!("--tls-cert {cert}: {e}"))?;
        let key = std::fs::read(key).map_err(|e| format!("--tls-key {key}: {e}"))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| format!("tls: {e}"))?;
    }

    start_link_loops(shared.clone(), out_rx, config.max_frame_bytes)?;

    shared
        .send(link::hello(port))
        .map_err(|e| e.message().to_owned())?;
    tokio::spawn(report_refusals(shared.clone()));

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    builder
        .add_service(Bridge(shared))
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| format!("server: {e}"))
}

/// The two loops over stdin/stdout. Pipes (what an Erlang port gives) are
/// read and written by tasks of the runtime itself; anything else (a file,
/// a terminal) by two threads of their own.
fn start_link_loops(
    shared: Arc<Shared>,
    out_rx: mpsc::UnboundedReceiver<Vec<u8>>,
    max_frame: usize,
) -> Result<(), String> {
    use std::os::fd::AsFd;
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map_err(|e| e.to_string());
    let pipes = (
        tokio::net::unix::pipe::Receiver::from_owned_fd(dup(std::io::stdin().as_fd())?),
        tokio::net::unix::pipe::Sender::from_owned_fd(dup(std::io::stdout().as_fd())?),
    );
    if let (Ok(input), Ok(output)) = pipes {
        tokio::spawn(write_pipe(out_rx, output));
        tokio::spawn(async move {
            read_pipe(&shared, input, max_frame).await;
            // The BEAM closed the port (or died): nothing left to serve.
            std::process::exit(0);
        });
        return Ok(());
    }
    std::thread::Builder::new()
        .name("dspex_grpc-out".into())
        .spawn(move || write_loop(out_rx))
        .map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("dspex_grpc-in".into())
        .spawn(move || {
            read_loop(&shared, max_frame);
            std::process::exit(0);
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Writes every frame ready with one `write` (each still its own
/// `{:packet, 4}` frame), up to 1 MiB at a time.
async fn write_pipe(
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    mut out: tokio::net::unix::pipe::Sender,
) {
    use tokio::io::AsyncWriteExt;
    let mut frames = Vec::with_capacity(256);
    let mut buf = Vec::with_capacity(64 << 10);
    while rx.recv_many(&mut frames, 256).await > 0 {
        for frame in frames.drain(..) {
            buf.extend_from_slice(&frame);
        }
        while buf.len() < 1 << 20 {
            match rx.try_recv() {
                Ok(frame) => buf.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        if out.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
}

/// Reads what the pipe holds in one `read` and dispatches every whole
/// frame in it.
async fn read_pipe(shared: &Shared, mut input: tokio::net::unix::pipe::Receiver, max_frame: usize) {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(256 << 10);
    loop {
        while buf.len() >= 4 {
            let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if n > max_frame {
                eprintln!("dspex_grpc: frame of {n} bytes over the limit; stopping");
                return;
            }
            if buf.len() < 4 + n {
                buf.reserve(4 + n - buf.len());
                break;
            }
            let frame = buf.split_to(4 + n);
            inbound(shared, &frame[4..]);
        }
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        match input.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn write_loop(mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 << 10, stdout.lock());
    while let Some(frame) = rx.blocking_recv() {
        if out.write_all(&frame).is_err() {
            return;
        }
        // Write a burst with one flush.
        while let Ok(frame) = rx.try_recv() {
            if out.write_all(&frame).is_err() {
                return;
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
}

fn read_loop(shared: &Shared, max_frame: usize) {
    let stdin = std::io::stdin();
    let mut input = std::io::BufReader::with_capacity(256 << 10, stdin.lock());
    let mut len = [0u8; 4];
    let mut body = Vec::new();
    loop {
        if input.read_exact(&mut len).is_err() {
            return;
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > max_frame {
            eprintln!("dspex_grpc: frame of {n} bytes over the limit; stopping");
            return;
        }
        body.resize(n, 0);
        if input.read_exact(&mut body).is_err() {
            return;
        }
        inbound(shared, &body);
    }
}

fn inbound(shared: &Shared, body: &[u8]) {
    match link::decode(body) {
        Ok(frame) => dispatch(shared, frame),
        Err((id, why)) => {
            eprintln!("dspex_grpc: bad frame from the BEAM: {why}");
            if let Some(id) = id {
                fail(shared, id, Status::internal(format!("bad reply: {why}")));
            }
        }
    }
}

fn fail(shared: &Shared, id: u64, status: Status) {
    match shared.pending().remove(&id) {
        Some(Pending::Unary(tx, _)) => {
            let _ = tx.send(Err(status));
        }
        Some(Pending::Stream(tx, _)) => {
            let _ = tx.try_send(Err(status));
        }
        None => {}
    }
}

fn encode(desc: &MessageDescriptor, value: &Mp) -> Result<Bytes, Status> {
    mp_to_message(desc, value)
        .map(|m| Bytes::from(m.encode_to_vec()))
        .map_err(|e| Status::internal(format!("bad reply: {e}")))
}

fn dispatch(shared: &Shared, frame: Inbound) {
    match frame {
        Inbound::Reply { id, response } => {
            if let Some(Pending::Unary(tx, desc)) = shared.pending().remove(&id) {
                let _ = tx.send(encode(&desc, &response));
            }
        }
        Inbound::Item { id, message } => {
            let pending = shared.pending();
            if let Some(Pending::Stream(tx, desc)) = pending.get(&id) {
                // The BEAM keeps within the window; an item past it is dropped
                // rather than queued.
                if tx.try_send(encode(desc, &message)).is_err() {
                    eprintln!("dspex_grpc: stream {id} over its window; item dropped");
                }
            }
        }
        Inbound::End { id } => {
            shared.pending().remove(&id);
        }
        Inbound::Status {
            id,
            code,
            message,
            error,
        } => {
            let mut status = Status::new(Code::from_i32(code), message);
            if let Ok(value) = error.parse() {
                if !error.is_empty() {
                    status.metadata_mut().insert("x-dspex-error", value);
                }
            }
            fail(shared, id, status);
        }
    }
}

/// The metadata the BEAM sees: the token, the trace context, the
/// `x-dspex-*` keys and the peer's address.
fn metadata_to_mp(meta: &MetadataMap, peer: Option<SocketAddr>) -> Mp {
    let mut out = Vec::new();
    for entry in meta.iter() {
        // Binary (`-bin`) keys carry nothing the BEAM reads.
        let KeyAndValueRef::Ascii(key, value) = entry else {
            continue;
        };
        let key = key.as_str();
        if matches!(key, "authorization" | "traceparent" | "tracestate")
            || key.starts_with("x-dspex-")
        {
            if let Ok(text) = value.to_str() {
                out.push((Mp::from(key), Mp::from(text)));
            }
        }
    }
    if let Some(peer) = peer {
        out.push((Mp::from("peer"), Mp::from(peer.to_string())));
    }
    Mp::Map(out)
}

fn decode_request(method: &Method, request: tonic::Request<Bytes>) -> Result<(Mp, Mp), Status> {
    let meta = metadata_to_mp(request.metadata(), request.remote_addr());
    let msg = DynamicMessage::decode(method.input.clone(), request.into_inner())
        .map_err(|e| Status::invalid_argument(format!("malformed {}: {e}", method.input.name())))?;
    let value = message_to_mp(&msg).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok((value, meta))
}

/// Removes the pending call and tells the BEAM, unless disarmed: dropped
/// with the call's future (the client went away) or the stream.
struct CancelGuard {
    shared: Arc<Shared>,
    id: u64,
    armed: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.pending().remove(&self.id);
            let _ = self.shared.send(link::cancel(self.id));
        }
    }
}

async fn unary(
    shared: Arc<Shared>,
    method: Method,
    request: tonic::Request<Bytes>,
) -> Result<tonic::Response<Bytes>, Status> {
    let (value, meta) = decode_request(&method, request)?;
    let Some(_slot) = shared.in_flight.take() else {
        let mut status = Status::resource_exhausted("too many calls in flight");
        status.metadata_mut().insert(
            "x-dspex-error",
            tonic::metadata::MetadataValue::from_static("busy"),
        );
        return Err(status);
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    shared
        .pending()
        .insert(id, Pending::Unary(tx, method.output.clone()));
    let mut guard = CancelGuard {
        shared: shared.clone(),
        id,
        armed: true,
    };
    shared.send(
        link::call(false, id, &method.name, value, meta).map_err(Status::invalid_argument)?,
    )?;
    let result = rx.await;
    guard.armed = false;
    match result {
        Ok(reply) => reply.map(tonic::Response::new),
        Err(_) => Err(Status::unavailable("the bridge restarted during the call")),
    }
}

async fn stream(
    shared: Arc<Shared>,
    method: Method,
    request: tonic::Request<Bytes>,
) -> Result<tonic::Response<CreditStream>, Status> {
    let (value, meta) = decode_request(&method, request)?;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    // One slot more than the window: a final status always fits.
    let (tx, rx) = mpsc::channel(shared.stream_window + 1);
    shared
        .pending()
        .insert(id, Pending::Stream(tx, method.output.clone()));
    let guard = CancelGuard {
        shared: shared.clone(),
        id,
        armed: true,
    };
    shared
        .send(link::call(true, id, &method.name, value, meta).map_err(Status::invalid_argument)?)?;
    Ok(tonic::Response::new(CreditStream { rx, guard }))
}

/// A stream's items as the client takes them; each one taken is a credit
/// for the BEAM. Dropped (the client went away), it cancels the stream.
pub struct CreditStream {
    rx: mpsc::Receiver<Result<Bytes, Status>>,
    guard: CancelGuard,
}

impl futures_util::Stream for CreditStream {
    type Item = Result<Bytes, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let poll = self.rx.poll_recv(cx);
        match &poll {
            Poll::Ready(Some(Ok(_))) => {
                let _ = self.guard.shared.send(link::credit(self.guard.id, 1));
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                // Ended by the BEAM: nothing to cancel.
                self.guard.armed = false;
            }
            Poll::Pending => {}
        }
        poll
    }
}

#[derive(Clone)]
struct Bridge(Arc<Shared>);

impl NamedService for Bridge {
    const NAME: &'static str = crate::SERVICE;
}

impl Service<http::Request<BoxBody>> for Bridge {
    type Response = http::Response<BoxBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        let shared = self.0.clone();
        let method = shared.methods.get(req.uri().path()).cloned();
        Box::pin(async move {
            let Some(method) = method else {
                return Ok(unimplemented());
            };
            let limit = Some(shared.max_message_bytes);
            let mut grpc =
                tonic::server::Grpc::new(RawCodec).apply_max_message_size_config(limit, limit);
            let svc = MethodSvc { shared, method };
            Ok(if svc.method.streaming {
                grpc.server_streaming(svc, req).await
            } else {
                grpc.unary(svc, req).await
            })
        })
    }
}

fn unimplemented() -> http::Response<BoxBody> {
    let mut response = http::Response::new(empty_body());
    let headers = response.headers_mut();
    headers.insert(
        Status::GRPC_STATUS,
        (Code::Unimplemented as i32).to_string().parse().unwrap(),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        tonic::metadata::GRPC_CONTENT_TYPE,
    );
    response
}

struct MethodSvc {
    shared: Arc<Shared>,
    method: Method,
}

impl UnaryService<Bytes> for MethodSvc {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(unary(self.shared.clone(), self.method.clone(), request))
    }
}

impl ServerStreamingService<Bytes> for MethodSvc {
    type Response = Bytes;
    type ResponseStream = CreditStream;
    type Future = BoxFuture<tonic::Response<CreditStream>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(stream(self.shared.clone(), self.method.clone(), request))
    }
}

/// Messages as raw bytes: decoding against descriptors happens in the
/// handler, where a malformed message becomes a clear INVALID_ARGUMENT.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Config, String> {
        Config::from_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn options() {
        let c = args(&["--port", "0", "--ip", "::1", "--max-streams", "4"]).unwrap();
        assert_eq!(c.port, 0);
        assert_eq!(c.ip.to_string(), "::1");
        assert_eq!(c.max_streams, 4);
        assert!(args(&["--port"]).is_err());
        assert!(args(&["--port", "70000"]).is_err());
        assert!(args(&["--max-concurrency", "0"]).is_err());
        assert_eq!(args(&[]).unwrap().max_in_flight, 1024);
        assert_eq!(args(&["--max-in-flight", "8"]).unwrap().max_in_flight, 8);
        assert!(args(&["--max-in-flight", "0"]).is_err());
        assert_eq!(args(&[]).unwrap().threads, 1);
        assert_eq!(args(&["--threads", "2"]).unwrap().threads, 2);
        assert!(args(&["--threads", "0"]).is_err());
        assert!(args(&["--tls-cert", "x"]).is_err());
        assert!(args(&["--bogus", "1"]).is_err());
    }

    #[test]
    fn in_flight_places_are_bounded_and_come_back() {
        let gate = InFlight::new(2);
        let a = gate.take().unwrap();
        let b = gate.take().unwrap();
        assert!(gate.take().is_none());
        assert!(gate.take().is_none());
        drop(a);
        let c = gate.take().unwrap();
        assert!(gate.take().is_none());
        drop((b, c));
        assert_eq!(gate.count.load(Ordering::Acquire), 0);
        // Three refusals, reported once.
        assert_eq!(gate.take_refused(), 3);
        assert_eq!(gate.take_refused(), 0);
    }

    #[test]
    fn every_method_is_known() {
        let pool = crate::descriptor_pool();
        let service = pool.get_service_by_name(crate::SERVICE).unwrap();
        let names: Vec<_> = service.methods().map(|m| m.name().to_owned()).collect();
        for name in [
            "Ping",
            "GetVariable",
            "SetVariable",
            "WatchVariables",
            "RollbackVariable",
            "CheckVariableAccess",
        ] {
            assert!(names.iter().any(|n| n == name), "{name}");
        }
        assert_eq!(names.len(), 28);
    }

    #[test]
    fn metadata_keeps_only_what_the_beam_needs() {
        let mut meta = MetadataMap::new();
        meta.insert("authorization", "Bearer t".parse().unwrap());
        meta.insert("traceparent", "00-ab-cd-01".parse().unwrap());
        meta.insert("x-dspex-lock-token", "3".parse().unwrap());
        meta.insert("cookie", "secret".parse().unwrap());
        let mp = metadata_to_mp(&meta, None);
        let keys: Vec<_> = mp
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(keys.len(), 3);
        assert!(!keys.contains(&"cookie".to_owned()));
    }
}
