//! Maeum site agent library: the glue the `maeum-site` binary runs.
#![forbid(unsafe_code)]

pub mod daemon;
pub mod enrol;
pub mod local;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
