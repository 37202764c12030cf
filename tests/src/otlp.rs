//! A test OTLP receiver: OpenTelemetry's own protobuf types (opentelemetry-proto),
//! served over gRPC (its generated tonic service) and over HTTP (`POST /v1/traces`,
//! protobuf body), keeping every span it decodes. It can also be told to hold every
//! answer back, as a collector that accepts connections and never answers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// One span as received.
#[derive(Debug, Clone)]
pub struct Span {
    /// `grpc` or `http`.
    pub via: &'static str,
    pub service: String,
    pub host: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(String, String)>,
    /// (name, attributes)
    pub events: Vec<(String, Vec<(String, String)>)>,
    /// 0 unset, 1 ok, 2 error.
    pub status: i32,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn pairs(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(&kv.value)))
        .collect()
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<Span>>,
    /// Hold every answer back (a collector that never answers).
    silent: AtomicBool,
}

impl Store {
    fn take(&self, via: &'static str, req: ExportTraceServiceRequest) {
        let mut out = Vec::new();
        for rs in req.resource_spans {
            let resource = rs
                .resource
                .map(|r| pairs(&r.attributes))
                .unwrap_or_default();
            let find = |k: &str| {
                resource
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let (service, host) = (find("service.name"), find("host.name"));
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        via,
                        service: service.clone(),
                        host: host.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name,
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                        attributes: pairs(&s.attributes),
                        events: s
                            .events
                            .iter()
                            .map(|e| (e.name.clone(), pairs(&e.attributes)))
                            .collect(),
                        status: s.status.map_or(0, |st| st.code),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(out);
    }
}

struct Grpc(Arc<Store>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        while self.0.silent.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.0.take("grpc", request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

pub struct Receiver {
    /// `http://127.0.0.1:PORT`, for OTEL_EXPORTER_OTLP_ENDPOINT with `grpc`.
    pub grpc: String,
    /// `http://127.0.0.1:PORT`, for OTEL_EXPORTER_OTLP_ENDPOINT with `http/protobuf`.
    pub http: String,
    store: Arc<Store>,
}

impl Receiver {
    pub fn start() -> Self {
        let store = Arc::new(Store::default());
        // Bound here, before the thread: its port is ours, and a failure is said now.
        let grpc_listener = TcpListener::bind("127.0.0.1:0").expect("a port for the gRPC receiver");
        grpc_listener.set_nonblocking(true).unwrap();
        let grpc = format!("http://{}", grpc_listener.local_addr().unwrap());
        let grpc_store = store.clone();
        std::thread::Builder::new()
            .name("otlp-grpc".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("a runtime for the gRPC receiver");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(grpc_listener)
                        .expect("the gRPC receiver's listener");
                    tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(Grpc(grpc_store)))
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                        .await
                        .expect("the gRPC receiver serves");
                });
            })
            .expect("the gRPC receiver's thread");
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port for the HTTP receiver");
        let http = format!("http://{}", listener.local_addr().unwrap());
        let http_store = store.clone();
        std::thread::Builder::new()
            .name("otlp-http".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let store = http_store.clone();
                    std::thread::spawn(move || serve_http(conn, &store));
                }
            })
            .expect("the HTTP receiver's thread");
        Self { grpc, http, store }
    }

    pub fn spans(&self) -> Vec<Span> {
        self.store.spans.lock().unwrap().clone()
    }

    /// Answers nothing from now on (connections accepted, requests read, no answer).
    pub fn go_silent(&self) {
        self.store.silent.store(true, Ordering::Release);
    }

    /// Waits until `done` holds of the spans received (bounded at `timeout`).
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Span]) -> bool,
    ) -> Vec<Span> {
        let t0 = Instant::now();
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                t0.elapsed() < timeout,
                "{what}: not received within {timeout:?}; received: {:#?}",
                spans
                    .iter()
                    .map(|s| format!("{} {} ({}, {})", s.host, s.name, s.trace_id, s.via))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// HTTP/1.1 requests on one connection: `POST /v1/traces` with a protobuf body.
fn serve_http(conn: TcpStream, store: &Store) {
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let (mut length, mut chunked) = (0usize, false);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                if r.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; n + 2];
                if r.read_exact(&mut chunk).is_err() {
                    return;
                }
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else {
            body.resize(length, 0);
            if r.read_exact(&mut body).is_err() {
                return;
            }
        }
        while store.silent.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let (status, reply) = match (path.as_str(), ExportTraceServiceRequest::decode(&body[..])) {
            ("/v1/traces", Ok(req)) => {
                store.take("http", req);
                (
                    "200 OK",
                    ExportTraceServiceResponse {
                        partial_success: None,
                    }
                    .encode_to_vec(),
                )
            }
            _ => ("400 Bad Request", Vec::new()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
            reply.len()
        );
        if w.write_all(head.as_bytes()).is_err() || w.write_all(&reply).is_err() {
            return;
        }
    }
}
