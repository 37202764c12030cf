//! Live migration: the wire protocol and the page codecs it carries.

pub mod codec;
pub mod destination;
pub mod dirty_windows;
pub mod disk_stream;
pub mod door;
mod frame_crc;
mod hot_pages;
mod link;
pub mod migratable;
mod page_receiver;
pub mod postcopy_dst;
pub mod postcopy_src;
mod priority;
pub mod protocol;
pub mod secure;
pub mod source;
pub mod storage;
mod tls_record;
mod vcpu_pages;
mod watchdog;
pub mod wire;

/// How this VMM moves a VM, in the terms a policy models it with (a driver hands
/// these to its policy; nothing in `policy/` knows them otherwise).
pub const MECHANICS: ferry_api::Mechanics = ferry_api::Mechanics {
    page_bytes: crate::guest::abi::PAGE_SIZE,
    batch_pages: source::BATCH as u32,
    min_split_batches: source::MIN_SPLIT as u32,
    min_batch_pages: source::MIN_BATCH as u32,
    max_rounds: source::MAX_SHRINKING_ROUNDS,
    disk_block_bytes: crate::vmm::block::COPY_BLOCK,
    min_disk_write_limit_bytes_per_sec: crate::vmm::block::MIN_DISK_WRITE_LIMIT_BYTES_PER_SEC,
    postcopy_pause_send_secs: hot_pages::PAUSE_SEND_SECS,
    postcopy_pause_pages_min: hot_pages::PAUSE_PAGES_MIN,
    postcopy_pause_pages_max: hot_pages::PAUSE_PAGES_MAX,
};

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

/// The span a migration's log lines are written in: it names the migration's trace
/// and span (W3C ids) when the handshake carried a trace context.
pub fn log_span(traceparent: &str) -> tracing::Span {
    match ferry_api::trace::trace_ids(traceparent) {
        Some((trace_id, span_id)) => {
            tracing::info_span!("migration", trace_id = %trace_id, span_id = %span_id)
        }
        None => tracing::Span::none(),
    }
}
