//! Peak memory of a snapshot import, measured by a counting allocator: an
//! import may cost a small multiple of the snapshot's size (the session it
//! builds included), never the ~60x a generic MessagePack tree cost.
//!
//! One test per binary would be cleaner, but the counter is process-wide:
//! the cases run one after another inside a single test so that no other
//! test's allocations land in a measurement.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use dspex_core::session::SessionOpts;
use dspex_core::snapshot::Snapshot;
use dspex_core::{Caller, Error, Store, Value, VarType, WriteMeta};

struct Peak;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Peak {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            let now = NOW.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
            NOW.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Peak = Peak;

/// Bytes allocated at the peak of `f`, above what was allocated before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = NOW.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - base)
}

fn snapshot(
    store: &Store,
    id: &str,
    vars: usize,
    value: impl Fn(usize, usize) -> Value,
) -> Vec<u8> {
    let opts = SessionOpts {
        max_history: 20,
        ..SessionOpts::default()
    };
    let s = store.create_session(id, opts, 0).unwrap();
    for i in 0..vars {
        let name = format!("v{i}");
        let ty = match value(i, 0) {
            Value::Float(_) => VarType::Float,
            Value::Str(_) => VarType::String,
            _ => VarType::Embedding,
        };
        s.register(Value::str(&name), ty, value(i, 0), Default::default(), 0)
            .unwrap();
        for n in 1..=20 {
            s.update(&name, value(i, n), WriteMeta::default(), &Caller::owner(0))
                .unwrap();
        }
    }
    store.export_session(id, 0).unwrap()
}

/// The value of variable `i` at version `n`.
type ValueAt = dyn Fn(usize, usize) -> Value;

#[test]
fn an_import_costs_a_small_multiple_of_the_snapshot() {
    let store = Store::new();
    let shapes: [(&str, usize, Box<ValueAt>); 3] = [
        (
            "floats",
            2_000,
            Box::new(|i, n| Value::Float((i * n) as f64 + 0.5)),
        ),
        (
            "strings",
            1_000,
            Box::new(|i, n| Value::Str(format!("{i}-{n}-{}", "x".repeat(64)).into())),
        ),
        (
            "embeddings",
            100,
            Box::new(|i, n| {
                Value::List(
                    (0..256)
                        .map(|k| Value::Float((i + n + k) as f64 * 0.25))
                        .collect(),
                )
            }),
        ),
    ];
    for (shape, vars, value) in shapes {
        let bytes = snapshot(&store, shape, vars, value);
        let (id, peak) =
            peak_of(|| store.import_session(&bytes, Some(&format!("{shape}-copy")), 0));
        id.unwrap();
        let ratio = peak as f64 / bytes.len() as f64;
        eprintln!(
            "{shape}: snapshot {} bytes, import peak {} bytes ({ratio:.1}x)",
            bytes.len(),
            peak
        );
        assert!(ratio < 8.0, "{shape}: import peak {ratio:.1}x the snapshot");
    }

    // A value far over the value limit, in a snapshot under the snapshot
    // limit: refused at that value, having allocated about the limit, not
    // the ~56 bytes per element a decoded tree of it would take.
    let s = store.session("floats", 0).unwrap();
    let mut snapshot = Snapshot::of(&s);
    snapshot.variables[0].metadata = Value::Map(
        vec![(
            Value::atom("blob"),
            Value::List(vec![Value::Nil; 1_000_000].into()),
        )]
        .into(),
    );
    let bytes = snapshot.encode().unwrap();
    drop(snapshot);
    let (r, peak) = peak_of(|| store.import_session(&bytes, Some("oversized"), 0));
    let ratio = peak as f64 / bytes.len() as f64;
    eprintln!(
        "oversized value: snapshot {} bytes, rejected import peak {peak} bytes ({ratio:.1}x)",
        bytes.len()
    );
    assert!(matches!(r, Err(Error::InvalidSnapshot(_))), "{r:?}");
    assert!(
        ratio < 8.0,
        "a rejected import peaked at {ratio:.1}x the snapshot"
    );
}
