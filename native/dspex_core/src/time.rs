//! Wall-clock time in microseconds since the Unix epoch, the unit of every
//! timestamp the engine stores.

use std::time::{SystemTime, UNIX_EPOCH};

/// The stamp "now, read the clock when it is needed": what the NIF's hot
/// paths pass instead of a time, so a read of a session without a TTL or a
/// rate limit reads no clock at all (a clock read is a fifth of a read's
/// cost). Every stamp goes through [`resolve`] where it is used. A
/// [`crate::command::Stamped`] command always carries a real time: this is
/// never applied by a replica.
pub const CLOCK: i64 = i64::MIN;

/// The time of stamp `now`: itself, or the clock's time for [`CLOCK`].
#[inline]
pub fn resolve(now: i64) -> i64 {
    if now == CLOCK {
        now_us()
    } else {
        now
    }
}

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
