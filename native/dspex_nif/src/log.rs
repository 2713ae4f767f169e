//! Forwards the engine's `tracing` events at warn level and above to
//! Elixir's `Logger`.
//!
//! A tracing [`Layer`] (filtered to WARN, so the core's debug spans cost a
//! disabled-callsite check) formats each event and pushes it onto a bounded
//! queue; it never touches the BEAM, so it is safe on scheduler threads. One
//! plain thread, started by the first `log_subscribe/1`, waits on the queue
//! and sends `{:dspex_log, [{level, target, message}]}` to the subscribed pid
//! with an `OwnedEnv`, which is only allowed off the schedulers. When the
//! queue is full the oldest records are dropped and counted.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use parking_lot::{Condvar, Mutex};
use rustler::{Atom, Encoder, Env, LocalPid, OwnedEnv, Term};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::atoms;

const QUEUE_CAPACITY: usize = 1024;

struct Record {
    level: Level,
    target: String,
    message: String,
}

#[derive(Default)]
struct Queue {
    records: VecDeque<Record>,
    subscriber: Option<LocalPid>,
}

struct Forwarder {
    queue: Mutex<Queue>,
    ready: Condvar,
    dropped: AtomicU64,
}

static FORWARDER: OnceLock<Forwarder> = OnceLock::new();

fn forwarder() -> &'static Forwarder {
    FORWARDER.get_or_init(|| Forwarder {
        queue: Mutex::default(),
        ready: Condvar::new(),
        dropped: AtomicU64::new(0),
    })
}

/// Installs the layer as the process-wide `tracing` subscriber, once; a
/// subscriber installed earlier by someone else wins.
fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let subscriber =
            tracing_subscriber::registry().with(QueueLayer.with_filter(LevelFilter::WARN));
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

struct QueueLayer;

impl<S: Subscriber> Layer<S> for QueueLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut text = MessageText::default();
        event.record(&mut text);
        let record = Record {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            message: text.finish(),
        };
        let f = forwarder();
        let mut q = f.queue.lock();
        if q.records.len() >= QUEUE_CAPACITY {
            q.records.pop_front();
            f.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.records.push_back(record);
        drop(q);
        f.ready.notify_one();
    }
}

/// `message` first, then the other fields as `key=value`.
#[derive(Default)]
struct MessageText {
    message: String,
    fields: String,
}

impl MessageText {
    fn finish(mut self) -> String {
        if !self.fields.is_empty() {
            if !self.message.is_empty() {
                self.message.push(' ');
            }
            self.message.push_str(&self.fields);
        }
        self.message
    }
}

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            if !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}

fn level_atom(level: Level) -> Atom {
    match level {
        Level::ERROR => atoms::error(),
        Level::WARN => atoms::warning(),
        Level::INFO => atoms::info(),
        _ => atoms::debug(),
    }
}

fn run() {
    let f = forwarder();
    let mut env = OwnedEnv::new();
    loop {
        let (records, pid) = {
            let mut q = f.queue.lock();
            while q.records.is_empty() || q.subscriber.is_none() {
                f.ready.wait(&mut q);
            }
            (std::mem::take(&mut q.records), q.subscriber)
        };
        let Some(pid) = pid else { continue };
        let _ = env.send_and_clear(&pid, |env| {
            let list: Vec<Term> = records
                .iter()
                .map(|r| (level_atom(r.level), r.target.as_str(), r.message.as_str()).encode(env))
                .collect();
            (atoms::dspex_log(), list).encode(env)
        });
    }
}

/// Makes `pid` the receiver of forwarded records and starts the forwarding
/// thread on first use. Only the process registered as
/// `DSPex.Bridge.NativeLog` may subscribe, so no caller can divert the
/// engine's logs to itself: `{:error, :not_registered}` otherwise.
#[rustler::nif(name = "log_subscribe")]
fn subscribe(env: Env, pid: LocalPid) -> Term {
    if env.whereis_pid(atoms::native_log()) != Some(pid) {
        return (atoms::error(), atoms::not_registered()).encode(env);
    }
    static THREAD: OnceLock<()> = OnceLock::new();
    install();
    let f = forwarder();
    f.queue.lock().subscriber = Some(pid);
    THREAD.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("dspex-log-forwarder".into())
            .spawn(run);
    });
    f.ready.notify_one();
    atoms::ok().encode(env)
}

/// Records dropped because the queue was full.
#[rustler::nif(name = "log_dropped")]
fn dropped() -> u64 {
    forwarder().dropped.load(Ordering::Relaxed)
}

/// Emits a tracing event at `level` from inside the engine; lets tests and
/// operators check the path from Rust to `Logger` end to end.
#[rustler::nif(name = "log_emit")]
fn emit<'a>(env: Env<'a>, level: Atom, message: String) -> Term<'a> {
    if level == atoms::error() {
        tracing::error!(target: "dspex_nif", "{message}");
    } else if level == atoms::warning() {
        tracing::warn!(target: "dspex_nif", "{message}");
    } else if level == atoms::info() {
        tracing::info!(target: "dspex_nif", "{message}");
    } else {
        return (atoms::error(), atoms::bad_level()).encode(env);
    }
    atoms::ok().encode(env)
}
