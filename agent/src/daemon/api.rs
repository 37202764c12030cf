//! The HTTP API: routes, who may call them, and the one error shape every failure
//! answers with (`{"kind": …, "message": …}`, the status fixed by the kind).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_api::agent::{
    AlertInfo, AlertsReceived, ApiError, ApiErrorKind, Health, IncomingOffer, IncomingRequest,
    MigrationInfo, StorageMigrationInfo, StorageMigrationRequest, VmInfo,
};
use serde::de::DeserializeOwned;

use super::auth::{self, Denied, Need};
use super::config::Tokens;
use super::inventory::{Inventory, View};
use super::metrics::{Metrics, Scrape};
use super::migrations::{MigrationRequest, Migrations, Refusal};
use super::storage::StorageMigrations;
use crate::sync::lock;

/// A request body's size at most (a migration request is well under a kilobyte).
pub const MAX_BODY: usize = 64 * 1024;

/// What the handlers share.
pub struct Shared {
    /// Set when the agent stops: watch streams end.
    pub stopping: std::sync::atomic::AtomicBool,
    pub host: String,
    pub tokens: Tokens,
    pub vms: View,
    pub metrics: Arc<Metrics>,
    /// Traces: the destination's spans of each arrival.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// The VMs' signals between migrations (the sampler's).
    pub observed: super::sampler::Shared,
    /// The agent's datastores, for their space.
    pub datastores: Vec<std::path::PathBuf>,
    pub inventory: Arc<Mutex<Inventory>>,
    pub migrations: Arc<Migrations>,
    pub storage: Arc<StorageMigrations>,
    pub run_dir: std::path::PathBuf,
    /// Alerts and the VMs they move away.
    pub evacuation: Arc<super::evacuate::Evacuation>,
    /// What `/healthz` tells peers of this host's room.
    pub capacity_memory_mib: u64,
    pub max_inbound: u32,
    /// See [`super::config::AgentConfig::peers_certified`].
    pub peers_certified: bool,
}

/// Every route, as `(method, path template)`: what `docs/openapi.json` must describe.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/v1/vms"),
    ("GET", "/v1/vms/{name}"),
    ("POST", "/v1/migrations"),
    ("GET", "/v1/migrations"),
    ("GET", "/v1/migrations/{id}"),
    ("DELETE", "/v1/migrations/{id}"),
    ("POST", "/v1/storage-migrations"),
    ("GET", "/v1/storage-migrations"),
    ("GET", "/v1/storage-migrations/{id}"),
    ("DELETE", "/v1/storage-migrations/{id}"),
    ("POST", "/v1/incoming"),
    ("POST", "/v1/alerts"),
    ("GET", "/v1/alerts"),
];

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{name}", get(get_vm))
        .route("/v1/migrations", post(start_migration).get(list_migrations))
        .route(
            "/v1/migrations/{id}",
            get(get_migration).delete(cancel_migration),
        )
        .route(
            "/v1/storage-migrations",
            post(start_storage_migration).get(list_storage_migrations),
        )
        .route(
            "/v1/storage-migrations/{id}",
            get(get_storage_migration).delete(cancel_storage_migration),
        )
        .route("/v1/incoming", post(receive))
        .route("/v1/alerts", post(post_alerts).get(list_alerts))
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            certified_peers,
        ))
        .layer(middleware::from_fn_with_state(shared.clone(), measured))
        .with_state(shared)
}

/// A failed request: its kind decides the status.
#[derive(Debug)]
pub struct Failure(pub ApiErrorKind, pub String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (
            status,
            Json(ApiError {
                kind: self.0,
                message: self.1,
            }),
        )
            .into_response();
        if self.0 == ApiErrorKind::Unauthenticated {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

fn authorize(shared: &Shared, headers: &HeaderMap, need: Need) -> Result<auth::Role, Failure> {
    let value = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or(""));
    auth::check(&shared.tokens, value, need).map_err(|d| match d {
        Denied::Unauthenticated(why) => Failure(ApiErrorKind::Unauthenticated, why.into()),
        Denied::Forbidden(role) => Failure(
            ApiErrorKind::Forbidden,
            format!("a {} token may not do this", role.as_str()),
        ),
    })
}

/// A peer's token alone does not make a peer where peers carry certificates: a
/// request with it on a connection that presented none is refused before any
/// handler (a token read off a host is not enough to push VMs at another).
async fn certified_peers(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if shared.peers_certified {
        let certified = req
            .extensions()
            .get::<axum::extract::ConnectInfo<super::tls::Caller>>()
            .is_some_and(|c| c.0.certified);
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        if !certified && auth::role_of(&shared.tokens, header) == Ok(auth::Role::Peer) {
            return Failure(
                ApiErrorKind::Unauthenticated,
                "a peer's token counts only with the peer's certificate: present the \
                 certificate the fleet's CA signed (the agent's tls_cert_file)"
                    .into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Counts and times every request under its route's template.
async fn measured(
    State(shared): State<Arc<Shared>>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let t0 = Instant::now();
    let method: &'static str = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::PUT => "PUT",
        _ => "other",
    };
    // Only known templates become labels: an unknown path is one label, not many.
    let route: &'static str = matched
        .and_then(|m| {
            ROUTES
                .iter()
                .find(|(_, p)| *p == m.as_str())
                .map(|(_, p)| *p)
        })
        .unwrap_or("other");
    let r = next.run(req).await;
    shared.metrics.request(
        route,
        method,
        r.status().as_u16(),
        t0.elapsed().as_secs_f64(),
    );
    r
}

async fn not_found() -> Failure {
    Failure(
        ApiErrorKind::NotFound,
        "no such endpoint; see docs/API.md".into(),
    )
}

async fn not_allowed() -> Failure {
    Failure(
        ApiErrorKind::MethodNotAllowed,
        "this endpoint does not take that method; see docs/API.md".into(),
    )
}

async fn health(State(s): State<Arc<Shared>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        name: s.host.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        vms: s.vms.all().len(),
        evacuating: s.evacuation.evacuating().is_some(),
        links: s
            .migrations
            .links()
            .into_iter()
            .map(|(peer, bytes_per_sec)| ferry_api::agent::PeerLink {
                peer,
                bytes_per_sec,
            })
            .collect(),
        capacity: Some(super::evacuate::capacity(
            &s.vms,
            s.capacity_memory_mib,
            s.max_inbound,
        )),
    })
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let vms = s.vms.all();
    let live: Vec<MigrationInfo> = s
        .migrations
        .list()
        .into_iter()
        .filter(|m| !m.state.ended())
        .collect();
    // A copy: a datastore slow to answer statvfs holds the scrape, not the sampler.
    let observed = lock(&s.observed).clone();
    let text = s.metrics.render(&Scrape {
        host: &s.host,
        vms: &vms,
        live: &live,
        arriving: vms.iter().filter(|v| v.arriving).count(),
        datastores: &s.datastores,
        observed: &observed,
        spans: s.telemetry.spans.get(),
    });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn list_vms(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<Vec<VmInfo>>, Failure> {
    authorize(&s, &headers, Need::Read)?;
    Ok(Json(s.vms.all()))
}

async fn get_vm(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<VmInfo>, Failure> {
    authorize(&s, &headers, Need::Read)?;
    s.vms.get(&name).map(Json).ok_or_else(|| {
        Failure(
            ApiErrorKind::NotFound,
            format!("no VM {name:?} on this host"),
        )
    })
}

/// A request's body: too large is 413, one that does not arrive whole 400.
fn read(bytes: Result<Bytes, BytesRejection>) -> Result<Bytes, Failure> {
    bytes.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Failure(
                ApiErrorKind::TooLarge,
                format!("the body is over {MAX_BODY} bytes"),
            )
        } else {
            Failure(ApiErrorKind::InvalidRequest, e.body_text())
        }
    })
}

/// A request body read as `T`: too large is 413, anything that does not read (bad
/// JSON, an unknown field, a wrong type) is 400 with the parser's words.
fn body<T: DeserializeOwned>(bytes: Result<Bytes, BytesRejection>) -> Result<T, Failure> {
    let bytes = read(bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Failure(
            ApiErrorKind::InvalidRequest,
            format!("the body does not read as this endpoint's JSON: {e}"),
        )
    })
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        Failure(r.0, r.1)
    }
}

/// Runs blocking work (VMM sockets, files, processes) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Failure(
            ApiErrorKind::Failed,
            format!("the request's task failed: {e}"),
        )
    })?
}

async fn start_migration(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    authorize(&s, &headers, Need::Operate)?;
    let req: MigrationRequest = body(bytes)?;
    if let Some(id) = s.storage.moving(&req.vm) {
        return Err(Failure(
            ApiErrorKind::Conflict,
            format!(
                "VM {} is moving its disks to another datastore (storage migration {id})",
                req.vm
            ),
        ));
    }
    let info = blocking(move || {
        s.migrations
            .start(req, &s.vms, &s.inventory, &s.run_dir)
            .map_err(Failure::from)
    })
    .await?;
    let location = format!("/v1/migrations/{}", info.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(info),
    )
        .into_response())
}

async fn list_migrations(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<Vec<MigrationInfo>>, Failure> {
    authorize(&s, &headers, Need::Read)?;
    Ok(Json(s.migrations.list()))
}

/// How often a watch looks for a change in the migration's record.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

async fn get_migration(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<std::collections::BTreeMap<String, String>>,
) -> Result<Response, Failure> {
    authorize(&s, &headers, Need::Read)?;
    let watch = match query.get("watch").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Failure(
                ApiErrorKind::InvalidRequest,
                format!("watch={other:?}: true or false"),
            ));
        }
    };
    let first = s
        .migrations
        .get(&id)
        .ok_or_else(|| Failure(ApiErrorKind::NotFound, format!("no migration {id:?}")))?;
    if !watch {
        return Ok(Json(first).into_response());
    }
    // Server-sent events: the whole record as event `migration` whenever it changes
    // (looked at every 250 ms), and a last `end` once it has ended.
    let stream = futures_util::stream::unfold(
        (s, id, None::<String>, false),
        |(s, id, last, done)| async move {
            if done {
                return None;
            }
            loop {
                let m = s.migrations.get(&id)?;
                let text = serde_json::to_string(&m).unwrap_or_default();
                let ended = m.state.ended();
                if last.as_deref() != Some(text.as_str()) || ended {
                    let kind = if ended { "end" } else { "migration" };
                    let event = sse::Event::default().event(kind).data(text.clone());
                    return Some((
                        Ok::<_, std::convert::Infallible>(event),
                        (s, id, Some(text), ended),
                    ));
                }
                if s.stopping.load(std::sync::atomic::Ordering::Acquire) {
                    return None;
                }
                tokio::time::sleep(WATCH_EVERY).await;
            }
        },
    );
    Ok(sse::Sse::new(stream)
        .keep_alive(sse::KeepAlive::default())
        .into_response())
}

async fn cancel_migration(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<MigrationInfo>), Failure> {
    authorize(&s, &headers, Need::Operate)?;
    let info = s.migrations.cancel(&id)?;
    Ok((StatusCode::ACCEPTED, Json(info)))
}

async fn start_storage_migration(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    authorize(&s, &headers, Need::Operate)?;
    let req: StorageMigrationRequest = body(bytes)?;
    let info = blocking(move || {
        let live = s.migrations.moving(&req.vm);
        s.storage.start(req, &s.vms, live).map_err(Failure::from)
    })
    .await?;
    let location = format!("/v1/storage-migrations/{}", info.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(info),
    )
        .into_response())
}

async fn list_storage_migrations(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<Vec<StorageMigrationInfo>>, Failure> {
    authorize(&s, &headers, Need::Read)?;
    Ok(Json(s.storage.list()))
}

async fn get_storage_migration(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<StorageMigrationInfo>, Failure> {
    authorize(&s, &headers, Need::Read)?;
    s.storage.get(&id).map(Json).ok_or_else(|| {
        Failure(
            ApiErrorKind::NotFound,
            format!("no storage migration {id:?}"),
        )
    })
}

/// Cancel: the VM stays on its old images.
async fn cancel_storage_migration(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<StorageMigrationInfo>), Failure> {
    authorize(&s, &headers, Need::Operate)?;
    let info = blocking(move || s.storage.cancel(&id).map_err(Failure::from)).await?;
    Ok((StatusCode::ACCEPTED, Json(info)))
}

async fn receive(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<IncomingOffer>), Failure> {
    authorize(&s, &headers, Need::Receive)?;
    let req: IncomingRequest = body(bytes)?;
    if let Some(why) = s.evacuation.evacuating() {
        return Err(Failure(
            ApiErrorKind::Conflict,
            format!("{why}: it takes no VM in"),
        ));
    }
    // The source's trace, joined: a malformed traceparent starts a trace of its own.
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let offer = blocking(move || {
        let mut trace = crate::telemetry::ReceiveTrace::start(
            &s.telemetry,
            traceparent.as_deref(),
            &req.vm,
            &req.source,
        );
        let failed = |e: super::inventory::ReceiveError| Failure(e.kind(), e.to_string());
        let reserved = lock(&s.inventory).reserve(&req);
        let reserved = match reserved {
            Ok(r) => r,
            Err(e) => {
                let f = failed(e);
                if let Some(t) = trace.as_mut() {
                    t.answered(f.0.http_status(), Some(&f.1));
                }
                return Err(f);
            }
        };
        // The VMM starts without the inventory's lock (the guard above is gone): a
        // slow start holds up neither the look at the other VMs nor other requests.
        let started = reserved.start();
        // The arrival's trace is handed over under the lock that makes it an
        // arrival, so its end cannot come first.
        let mut inventory = lock(&s.inventory);
        let offer = inventory.received(reserved, started).map_err(failed);
        if let Some(mut t) = trace.take() {
            match &offer {
                Ok(_) => {
                    t.answered(201, None);
                    inventory.trace_arrival(&req.vm, t);
                }
                Err(Failure(kind, why)) => t.answered(kind.http_status(), Some(why)),
            }
        }
        offer
    })
    .await?;
    Ok((StatusCode::CREATED, Json(offer)))
}

/// Alertmanager's webhook: booked at once (the moves happen on the evacuation's
/// thread), answered with what each alert led to.
async fn post_alerts(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<AlertsReceived>, Failure> {
    authorize(&s, &headers, Need::Alert)?;
    // Not `body`: Alertmanager's payload carries fields Ferry does not read.
    let bytes = read(bytes)?;
    let payload: super::alerts::Payload = serde_json::from_slice(&bytes).map_err(|e| {
        Failure(
            ApiErrorKind::InvalidRequest,
            format!("not Alertmanager's webhook payload: {e}"),
        )
    })?;
    let alerts = s
        .evacuation
        .receive(&payload)
        .map_err(|e| Failure(ApiErrorKind::InvalidRequest, e.0))?;
    Ok(Json(AlertsReceived { alerts }))
}

async fn list_alerts(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<Vec<AlertInfo>>, Failure> {
    authorize(&s, &headers, Need::Read)?;
    Ok(Json(s.evacuation.alerts()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ferry_api::agent::MigrationState;

    use super::*;

    fn openapi() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let text = std::fs::read_to_string(path).expect("docs/openapi.json");
        serde_json::from_str(&text).expect("docs/openapi.json is JSON")
    }

    #[test]
    fn the_openapi_file_describes_every_route_and_no_other() {
        let doc = openapi();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut described = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                described.insert((method.to_uppercase(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        assert_eq!(described, served);
        let md = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md"))
            .expect("docs/API.md");
        for (m, p) in ROUTES {
            assert!(
                md.contains(&format!("{m} {p}")),
                "docs/API.md says nothing of {m} {p}"
            );
        }
    }

    #[test]
    fn the_openapi_schemas_name_every_field_the_agent_sends() {
        let doc = openapi();
        let vm = VmInfo::new("a", "a.toml".into());
        let health = Health {
            status: "ok".into(),
            name: "h".into(),
            version: "0".into(),
            vms: 0,
            evacuating: false,
            links: vec![ferry_api::agent::PeerLink {
                peer: "p".into(),
                bytes_per_sec: 1.0,
            }],
            capacity: Some(ferry_api::agent::Capacity {
                memory_mib: 1,
                vms_memory_mib: 0,
                max_inbound: 2,
                inbound: 0,
            }),
        };
        let alert = AlertInfo {
            fingerprint: "f".into(),
            alertname: "A".into(),
            status: "firing".into(),
            host: None,
            vm: None,
            action: "none".into(),
            rule: 0,
            received_unix_ms: 0,
            repeats: 0,
            queued: Vec::new(),
            migrations: Vec::new(),
            note: None,
        };
        let received = AlertsReceived {
            alerts: vec![ferry_api::agent::AlertOutcome {
                fingerprint: "f".into(),
                alertname: "A".into(),
                action: "ignored".into(),
                reason: String::new(),
            }],
        };
        let error = ApiError {
            kind: ApiErrorKind::Busy,
            message: String::new(),
        };
        let migration = MigrationInfo::new("m1".into(), "a", "h", "p", "adaptive", 0);
        let offer = IncomingOffer {
            address: "a".into(),
            ticket: "t".into(),
        };
        let incoming = IncomingRequest {
            vm: "a".into(),
            config: String::new(),
            source: "h".into(),
            copy_storage: false,
        };
        let storage = StorageMigrationInfo::new("s1".into(), "a", "d", "d/a".into(), 0);
        for (name, value) in [
            (
                "StorageMigrationInfo",
                serde_json::to_value(&storage).unwrap(),
            ),
            ("MigrationInfo", serde_json::to_value(&migration).unwrap()),
            ("IncomingOffer", serde_json::to_value(&offer).unwrap()),
            ("IncomingRequest", serde_json::to_value(&incoming).unwrap()),
            ("VmInfo", serde_json::to_value(&vm).unwrap()),
            ("Health", serde_json::to_value(&health).unwrap()),
            (
                "Capacity",
                serde_json::to_value(health.capacity.as_ref().unwrap()).unwrap(),
            ),
            ("AlertInfo", serde_json::to_value(&alert).unwrap()),
            ("PeerLink", serde_json::to_value(&health.links[0]).unwrap()),
            ("AlertsReceived", serde_json::to_value(&received).unwrap()),
            (
                "AlertOutcome",
                serde_json::to_value(&received.alerts[0]).unwrap(),
            ),
            ("ApiError", serde_json::to_value(&error).unwrap()),
        ] {
            let sent: BTreeSet<&String> = value.as_object().unwrap().keys().collect();
            let schema = &doc["components"]["schemas"][name]["properties"];
            let described: BTreeSet<&String> = schema.as_object().expect(name).keys().collect();
            assert_eq!(sent, described, "{name}");
        }
        let states: Vec<&str> = MigrationState::ALL.iter().map(|s| s.as_str()).collect();
        let described: Vec<&str> =
            doc["components"]["schemas"]["MigrationInfo"]["properties"]["state"]["enum"]
                .as_array()
                .expect("the states")
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
        assert_eq!(states, described);
    }
}
