//! Ended spans go into a bounded queue and a thread of their own exports them in
//! batches. Nothing a collector does reaches a migration: a span that finds the queue
//! full is dropped (not waited for), an export that fails or takes longer than
//! `EXPORT_WITHIN` drops its batch, and both are counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

use super::SpanCounts;

/// Spans waiting at most: a migration makes tens.
const QUEUE: usize = 2048;
/// Spans per export, and the longest a span waits for its batch.
const BATCH: usize = 512;
const LINGER: Duration = Duration::from_secs(1);
/// One export's bound, retries included.
const EXPORT_WITHIN: Duration = Duration::from_secs(10);

enum Msg {
    Span(Box<SpanData>),
    Resource(Resource),
    /// Export what is queued, then answer.
    Flush(SyncSender<()>),
    Stop(SyncSender<()>),
}

pub enum StartError {
    Thread(std::io::Error),
    Exporter(String),
}

#[derive(Debug)]
pub struct Queue {
    tx: SyncSender<Msg>,
    spans: Arc<SpanCounts>,
    /// Set by a shutdown that found the queue full: the thread stops after the
    /// export it is in, its queue unsent.
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Queue {
    /// Starts the exporting thread with the OTLP exporter the standard variables
    /// describe (built inside the thread's runtime, which gRPC's channel needs).
    pub fn start(spans: Arc<SpanCounts>) -> Result<Self, StartError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let counts = spans.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("otlp".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => return drop(ready_tx.send(Err(e.to_string()))),
                };
                let built = {
                    let _in = runtime.enter();
                    opentelemetry_otlp::SpanExporter::builder().build()
                };
                match built {
                    Ok(exporter) => {
                        let _ = ready_tx.send(Ok(()));
                        run(&runtime, exporter, &rx, &counts, &stopped);
                    }
                    Err(e) => drop(ready_tx.send(Err(e.to_string()))),
                }
            })
            .map_err(StartError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { tx, spans, stop }),
            Ok(Err(e)) => Err(StartError::Exporter(e)),
            Err(_) => Err(StartError::Exporter("its thread ended".into())),
        }
    }

    /// Sends `msg` and waits (up to `within`) for the thread's answer; a full queue
    /// is not waited on (a collector that is away keeps it full).
    fn ask(&self, msg: impl FnOnce(SyncSender<()>) -> Msg, within: Duration) -> OTelSdkResult {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        match self.tx.try_send(msg(ack)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(OTelSdkError::Timeout(Duration::ZERO)),
            Err(TrySendError::Disconnected(_)) => return Err(OTelSdkError::AlreadyShutdown),
        }
        done.recv_timeout(within)
            .map_err(|_| OTelSdkError::Timeout(within))
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.spans.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Msg::Flush, EXPORT_WITHIN + Duration::from_secs(1))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let asked = self.ask(Msg::Stop, timeout);
        if asked.is_err() {
            self.stop.store(true, Ordering::Release);
        }
        asked
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Before any span: the queue has room.
        let _ = self.tx.try_send(Msg::Resource(resource.clone()));
    }
}

fn run(
    runtime: &tokio::runtime::Runtime,
    mut exporter: opentelemetry_otlp::SpanExporter,
    rx: &Receiver<Msg>,
    counts: &SpanCounts,
    stop: &AtomicBool,
) {
    let mut batch: Vec<SpanData> = Vec::new();
    let mut oldest: Option<Instant> = None;
    let mut warned: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        let wait = oldest.map_or(LINGER, |t| LINGER.saturating_sub(t.elapsed()));
        let msg = rx.recv_timeout(wait);
        let (now, ack, stop) = match msg {
            Ok(Msg::Span(s)) => {
                batch.push(*s);
                oldest.get_or_insert_with(Instant::now);
                (batch.len() >= BATCH, None, false)
            }
            Ok(Msg::Resource(r)) => {
                exporter.set_resource(&r);
                (false, None, false)
            }
            Ok(Msg::Flush(ack)) => (true, Some(ack), false),
            Ok(Msg::Stop(ack)) => (true, Some(ack), true),
            Err(RecvTimeoutError::Timeout) => (true, None, false),
            Err(RecvTimeoutError::Disconnected) => (true, None, true),
        };
        if now {
            oldest = None;
            export_batch(runtime, &exporter, &mut batch, counts, &mut warned);
        }
        if let Some(ack) = ack {
            let _ = ack.send(());
        }
        if stop {
            return;
        }
    }
}

/// Exports `batch` (emptying it), counting its spans as exported or dropped.
fn export_batch(
    runtime: &tokio::runtime::Runtime,
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    counts: &SpanCounts,
    warned: &mut Option<Instant>,
) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    let spans = std::mem::take(batch);
    // The timer is made inside the runtime, which it needs.
    let result = runtime
        .block_on(async { tokio::time::timeout(EXPORT_WITHIN, exporter.export(spans)).await });
    let why = match result {
        Ok(Ok(())) => {
            counts.exported.fetch_add(n, Ordering::Relaxed);
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {} s", EXPORT_WITHIN.as_secs()),
    };
    counts.dropped.fetch_add(n, Ordering::Relaxed);
    // Once a minute at most: a collector that is away says so, not every second.
    if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
        *warned = Some(Instant::now());
        tracing::warn!("{n} spans not exported: {why}");
    }
}
