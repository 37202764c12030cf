//! A migration's spans on its destination, in the source's trace (the `traceparent`
//! the source's agent sent with `POST /v1/incoming`): the server span of that call,
//! and under it `receive`, from the call until the VM runs here (or does not), with
//! `vmm start` (the receiving VMM started and listening) and then `receiving`.

use std::time::SystemTime;

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;

use super::Telemetry;

pub struct ReceiveTrace {
    tracer: SdkTracer,
    server: Option<Context>,
    receive: Context,
    /// `vmm start`, then `receiving`.
    step: Option<Context>,
}

impl ReceiveTrace {
    /// Begun now, under the caller's `traceparent` (a trace of its own without one);
    /// None when traces are off.
    pub fn start(t: &Telemetry, traceparent: Option<&str>, vm: &str, source: &str) -> Option<Self> {
        let tracer = t.tracer()?.clone();
        let parent = super::parent(traceparent);
        let server = tracer
            .span_builder("POST /v1/incoming")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("http.route", "/v1/incoming"),
            ])
            .start_with_context(&tracer, &parent);
        let server = parent.with_span(server);
        let receive = tracer
            .span_builder("receive")
            .with_attributes([
                KeyValue::new("ferry.vm", vm.to_owned()),
                KeyValue::new("ferry.source", source.to_owned()),
            ])
            .start_with_context(&tracer, &server);
        let receive = server.with_span(receive);
        let step = tracer
            .span_builder("vmm start")
            .start_with_context(&tracer, &receive);
        let step = Some(receive.with_span(step));
        Some(Self {
            tracer,
            server: Some(server),
            receive,
            step,
        })
    }

    /// The call was answered with `status`: the VMM listens (or the VM is refused,
    /// `error` says why, and the trace ends here).
    pub fn answered(&mut self, status: u16, error: Option<&str>) {
        let now = SystemTime::now();
        if let Some(s) = self.step.take() {
            if let Some(e) = error {
                s.span().set_status(Status::error(e.to_owned()));
            }
            s.span().end_with_timestamp(now);
        }
        if let Some(server) = self.server.take() {
            let span = server.span();
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 500 {
                span.set_status(Status::error(error.unwrap_or("").to_owned()));
            }
            span.end_with_timestamp(now);
        }
        if let Some(e) = error {
            self.finish(Err(e));
            return;
        }
        let step = self
            .tracer
            .span_builder("receiving")
            .with_start_time(now)
            .start_with_context(&self.tracer, &self.receive);
        self.step = Some(self.receive.with_span(step));
    }

    /// The VM runs here (Ok), or will not (Err: why).
    pub fn finish(&mut self, outcome: Result<(), &str>) {
        let now = SystemTime::now();
        let status = match outcome {
            Ok(()) => Status::Ok,
            Err(e) => Status::error(e.to_owned()),
        };
        if let Some(s) = self.step.take() {
            s.span().set_status(status.clone());
            s.span().end_with_timestamp(now);
        }
        let r = self.receive.span();
        if r.is_recording() {
            r.set_attribute(KeyValue::new("ferry.received", outcome.is_ok()));
            r.set_status(status);
            r.end_with_timestamp(now);
        }
    }
}

impl Drop for ReceiveTrace {
    /// Not followed to its end (the agent stopped): what is known still goes.
    fn drop(&mut self) {
        if self.step.is_some() || self.server.is_some() {
            if let Some(server) = self.server.take() {
                server.span().end();
            }
            self.finish(Err("the agent stopped following it"));
        }
    }
}
