//! OpenTelemetry traces: one per migration, across both hosts.
//!
//! The agent exports every span of its host, the VMMs none: a VMM is the data path
//! and owns guest memory, so it carries no network client, runtime or buffer of
//! someone else's; the agent already follows each migration through the driver's
//! events (source) and each arrival through its inventory (destination), and one
//! exporter per host is one queue to bound and one place that counts what it drops.
//! The VMMs still carry the trace context (in the migration handshake) so their own
//! log lines name the trace.
//!
//! Configured only by OpenTelemetry's standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; unset: nothing is exported),
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or `http/protobuf`, the default),
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (and its
//! `_ARG`), `OTEL_SDK_DISABLED`.

mod export;
pub mod migration;
pub mod receive;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

pub use migration::MigrationTrace;
pub use receive::ReceiveTrace;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "OTEL_EXPORTER_OTLP_PROTOCOL={0:?}: Ferry exports traces over \"grpc\" or \
         \"http/protobuf\""
    )]
    Protocol(String),
    #[error("the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("cannot start the span exporter's thread: {0}")]
    Thread(std::io::Error),
}

/// What the exporter did with the spans it was given.
#[derive(Debug, Default)]
pub struct SpanCounts {
    pub exported: AtomicU64,
    /// Left out: the queue was full (the collector is slow or away), or their export
    /// failed or timed out.
    pub dropped: AtomicU64,
}

impl SpanCounts {
    pub fn get(&self) -> (u64, u64) {
        (
            self.exported.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

/// The host's tracer; off (every trace a no-op) when no endpoint is set.
pub struct Telemetry {
    tracing: Option<(SdkTracerProvider, SdkTracer)>,
    pub spans: Arc<SpanCounts>,
    /// Where spans go, for the log.
    pub endpoint: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Telemetry {
    pub fn off() -> Self {
        Self {
            tracing: None,
            spans: Arc::default(),
            endpoint: None,
        }
    }

    /// From the standard variables; `service` names this process when neither
    /// `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` does, and `host` is its
    /// `host.name` unless they say otherwise.
    pub fn from_env(service: &str, host: &str) -> Result<Self, TelemetryError> {
        let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let Some(endpoint) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .filter(|_| !disabled)
        else {
            return Ok(Self::off());
        };
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = env(var)
                && p != "grpc"
                && p != "http/protobuf"
            {
                return Err(TelemetryError::Protocol(p));
            }
        }
        let attributes = env("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
        let says = |key: &str| {
            attributes
                .split(',')
                .any(|kv| kv.split('=').next().map(str::trim) == Some(key))
        };
        let mut resource = Resource::builder();
        if env("OTEL_SERVICE_NAME").is_none() && !says("service.name") {
            resource = resource.with_service_name(service.to_owned());
        }
        if !says("host.name") {
            resource = resource.with_attribute(KeyValue::new("host.name", host.to_owned()));
        }
        resource =
            resource.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        let spans = Arc::new(SpanCounts::default());
        let queue = export::Queue::start(spans.clone()).map_err(|e| match e {
            export::StartError::Thread(e) => TelemetryError::Thread(e),
            export::StartError::Exporter(message) => TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                message,
            },
        })?;
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_span_processor(queue)
            .build();
        let tracer = provider.tracer("ferry");
        Ok(Self {
            tracing: Some((provider, tracer)),
            spans,
            endpoint: Some(endpoint),
        })
    }

    pub fn tracer(&self) -> Option<&SdkTracer> {
        self.tracing.as_ref().map(|(_, t)| t)
    }

    /// Exports what is queued (bounded: a collector that does not answer is given
    /// up on) and stops the exporter.
    pub fn shutdown(&self) {
        if let Some((provider, _)) = &self.tracing {
            let _ = provider.shutdown_with_timeout(std::time::Duration::from_secs(5));
        }
    }
}

/// W3C `traceparent` of the span `cx` holds (None: no valid span).
pub fn traceparent(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The remote parent a W3C `traceparent` names; an empty context (a new trace) when
/// there is none or it does not parse, as the W3C recommendation asks.
pub fn parent(traceparent: Option<&str>) -> Context {
    let mut carrier: HashMap<String, String> = HashMap::new();
    if let Some(t) = traceparent {
        carrier.insert("traceparent".into(), t.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_a_bad_one_starts_a_new_trace() {
        let t = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent(&parent(Some(t))).as_deref(), Some(t));
        for bad in ["", "00-xyz-00f067aa0ba902b7-01", "garbage"] {
            assert_eq!(traceparent(&parent(Some(bad))), None, "{bad}");
        }
        assert!(Telemetry::off().tracer().is_none());
    }
}
