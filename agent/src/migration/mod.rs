//! Live migration: the wire protocol and the page codecs it carries.

pub mod codec;
pub mod destination;
pub mod dirty_windows;
pub mod disk_stream;
pub mod door;
pub(crate) mod hot_pages;
mod link;
pub mod postcopy_dst;
pub mod postcopy_src;
mod priority;
pub mod protocol;
pub mod source;
pub mod storage;
mod vcpu_pages;
mod watchdog;
pub mod wire;

/// Times the steps of the handover (FERRY_LOG=debug shows them).
pub(crate) struct Lap(std::time::Instant);

impl Lap {
    pub(crate) fn new() -> Self {
        Self(std::time::Instant::now())
    }

    pub(crate) fn mark(&mut self, step: &str) {
        tracing::debug!(
            "handover: {step} after {:.3} ms",
            self.0.elapsed().as_secs_f64() * 1e3
        );
        self.0 = std::time::Instant::now();
    }
}
