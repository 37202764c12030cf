//! The incoming port of `ferry vmm --incoming`: one listener for everything a
//! migration opens (its stream, the post-copy fault channel, recoveries, a `Resolve`
//! of a handover in doubt), and for whoever else connects.
//!
//! Each connection gets a thread of its own for its first frame, which must come
//! within [`HELLO_WAIT`] and be small; that frame routes it. A `Hello` claims the one
//! migration this process receives at a time; every later connection of that
//! migration must name its [`Session`] (the source's id and this side's secret).
//! Anything else is logged, counted and closed, and leaves nothing behind: a
//! migration that fails before the guest runs here is torn down whole and the port
//! waits for the next. Only a real migration ends the waiting.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};

use super::secure::{self, Conn, Transport};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::destination::{self, Slot};
use super::protocol::{self, Message, ProtocolError, Session};
use crate::sync::lock;
use crate::vmm::prealloc::Prealloc;

/// How long a new connection may take to send its first frame: the source's default
/// keepalive (`--timeout-secs`). A silent stranger holds a thread this long, never
/// the port.
pub const HELLO_WAIT: Duration = Duration::from_secs(5);
/// A connection's first frame at most (a `Hello` names a VM; the rest are smaller).
const FIRST_FRAME_MAX: u32 = 4096;
/// Connections waiting to send their first frame at most; more are closed at once.
const MAX_WAITING: usize = 64;

/// Where the disks of an incoming VM go: its own copies under `datastore` (they
/// travel with it), or the images of the same names in `shared` (shared storage).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub datastore: Option<PathBuf>,
    pub shared: Vec<PathBuf>,
}

/// A later connection of the migration being received, with its first message.
pub struct Routed {
    pub first: Message,
    pub conn: Conn,
}

pub use ferry_api::PortCounters;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Receiving,
    /// The guest runs here, or waits here for its source's word (in doubt).
    Arrived(Session),
}

pub struct Door {
    slot: Slot,
    listening: SocketAddr,
    place: Placement,
    /// The one-time ticket a source must present (None: any source may migrate here).
    /// Spent by the first `Hello` that presents it: a failed migration is not retried
    /// on this port; whoever issued the ticket starts a fresh destination.
    ticket: Option<String>,
    ticket_spent: std::sync::atomic::AtomicBool,
    /// TLS (sources must prove themselves with a certificate the CA signed) or plain
    /// TCP (`--insecure`).
    transport: Transport,
    phase: Mutex<Phase>,
    /// The migration being received: its session, and where its later connections go.
    route: Mutex<Option<(Session, mpsc::Sender<Routed>)>>,
    waiting: AtomicUsize,
    counters: Mutex<PortCounters>,
    /// The guest memory size the VM expected here has (`--memory-mib`), and that
    /// memory, faulted in while the port waits; taken by the next migration.
    prealloc: Option<u64>,
    memory: Mutex<Option<Prealloc>>,
}

/// Counts a connection as waiting for its first frame while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads from a connection until a deadline, however the bytes trickle in.
struct Until<'a> {
    conn: &'a Conn,
    deadline: Instant,
}

impl Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.conn.set_read_timeout(Some(left))?;
        (&mut &*self.conn).read(buf)
    }
}

impl Door {
    pub fn new(
        slot: Slot,
        place: Placement,
        ticket: Option<String>,
        listening: SocketAddr,
        transport: Transport,
        prealloc: Option<u64>,
    ) -> Arc<Self> {
        let door = Arc::new(Self {
            slot,
            listening,
            place,
            ticket,
            ticket_spent: std::sync::atomic::AtomicBool::new(false),
            transport,
            phase: Mutex::new(Phase::Waiting),
            route: Mutex::new(None),
            waiting: AtomicUsize::new(0),
            counters: Mutex::new(PortCounters::default()),
            prealloc,
            memory: Mutex::new(None),
        });
        door.preallocate();
        door
    }

    /// Starts faulting in the memory of the VM expected here, if its size is known
    /// and nothing holds it yet.
    fn preallocate(&self) {
        let Some(bytes) = self.prealloc else { return };
        let mut memory = lock(&self.memory);
        if memory.is_some() {
            return;
        }
        match Prealloc::start(bytes) {
            Ok(p) => *memory = Some(p),
            Err(e) => tracing::warn!(
                "cannot preallocate {} MiB of guest memory ({e}); pages will fault in as \
                 they land",
                bytes >> 20
            ),
        }
    }

    pub fn listening(&self) -> SocketAddr {
        self.listening
    }

    pub fn counters(&self) -> PortCounters {
        let mut c = lock(&self.counters).clone();
        c.receiving = *lock(&self.phase) == Phase::Receiving;
        c
    }

    /// Accepts connections for as long as the process lives.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) {
        loop {
            let (conn, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: back off rather than spin.
                    tracing::warn!("accepting on the incoming port: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITING {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                self.reject(
                    peer,
                    &format!("{MAX_WAITING} connections are already waiting to say hello"),
                );
                continue;
            }
            let door = self.clone();
            let spawned = std::thread::Builder::new()
                .name("incoming".into())
                .spawn(move || door.handle(conn, peer));
            if let Err(e) = spawned {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                self.reject(peer, &format!("no thread for it: {e}"));
            }
        }
    }

    fn reject(&self, peer: SocketAddr, why: &str) {
        tracing::warn!("incoming port: closed a connection from {peer}: {why}");
        let mut c = lock(&self.counters);
        c.rejected_connections += 1;
        c.last_rejection = Some(format!("{peer}: {why}"));
    }

    /// Whether the transport is TLS, and if so the handshake: a source that is not
    /// who the CA says it may be is refused here, before it can say anything.
    fn secure(&self, tcp: TcpStream) -> Result<Conn, String> {
        let silent = || format!("it said nothing within {} s", HELLO_WAIT.as_secs());
        tcp.set_read_timeout(Some(HELLO_WAIT))
            .map_err(|e| e.to_string())?;
        let mut first = [0u8; 1];
        match tcp.peek(&mut first) {
            Ok(0) => return Err("it closed without a word".into()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(silent());
            }
            Err(e) => return Err(e.to_string()),
        }
        let tls_hello = first[0] == secure::TLS_HANDSHAKE;
        match &self.transport {
            Transport::Tls(tls) if tls_hello => {
                Conn::server(tcp, tls, HELLO_WAIT).map_err(|e| e.to_string())
            }
            Transport::Tls(_) => {
                let why = "refused: this destination takes migrations over TLS only, and the \
                           source connected without it (--insecure)";
                // In the clear, so that a source without TLS can read why.
                let _ = protocol::send(
                    &mut Conn::plain(tcp),
                    &Message::Abort { reason: why.into() },
                );
                Err(why.into())
            }
            Transport::Insecure if tls_hello => Err(
                "it began a TLS handshake, and this destination was started with --insecure \
                 (plain TCP)"
                    .into(),
            ),
            Transport::Insecure => Ok(Conn::plain(tcp)),
        }
    }

    fn handle(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let waiting = Waiting(&self.waiting);
        let deadline = Instant::now() + HELLO_WAIT;
        let conn = match self.secure(tcp) {
            Ok(c) => c,
            Err(why) => {
                drop(waiting);
                return self.reject(peer, &why);
            }
        };
        let first = (|| -> Result<Message, ProtocolError> {
            let mut r = Until {
                conn: &conn,
                deadline,
            };
            let mut payload = Vec::new();
            let kind = protocol::read_frame_within(&mut r, &mut payload, FIRST_FRAME_MAX)?;
            Message::decode(&protocol::Frame { kind, payload }, None)
        })();
        drop(waiting);
        // A connection is closed before it is counted: whoever reads the counters
        // finds nothing of it left.
        let first = match first {
            Ok(m) => m,
            Err(ProtocolError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                drop(conn);
                return self.reject(
                    peer,
                    &format!("it said nothing within {} s", HELLO_WAIT.as_secs()),
                );
            }
            Err(e) => {
                drop(conn);
                return self.reject(peer, &e.to_string());
            }
        };
        let _ = conn.set_read_timeout(None);
        let _ = conn.set_nodelay(true);
        match first {
            Message::Hello(hello) => self.receive(conn, peer, hello),
            Message::FaultChannel { session } | Message::Recover { session } => {
                let route = lock(&self.route)
                    .as_ref()
                    .filter(|(s, _)| *s == session)
                    .map(|(_, tx)| tx.clone());
                match route {
                    Some(tx) => {
                        if tx.send(Routed { first, conn }).is_err() {
                            self.reject(peer, "its migration has ended");
                        }
                    }
                    None => {
                        drop(conn);
                        self.reject(peer, "it names no migration under way here");
                    }
                }
            }
            Message::Resolve { session, committed } => self.resolve(conn, peer, session, committed),
            other => {
                drop(conn);
                self.reject(
                    peer,
                    &format!("it began with {:?}, not Hello", other.kind()),
                );
            }
        }
    }

    /// Tells a source why it is turned away, then counts it.
    fn turn_away(&self, mut conn: Conn, peer: SocketAddr, why: String) {
        let _ = protocol::send(
            &mut conn,
            &Message::Abort {
                reason: why.clone(),
            },
        );
        drop(conn);
        self.reject(peer, &why);
    }

    fn receive(&self, conn: Conn, peer: SocketAddr, hello: protocol::Hello) {
        if let Some(ticket) = &self.ticket {
            // Over TLS the source proves it knows the ticket with keying material
            // of this very session: a proof replayed on another connection fails.
            let expected = conn.ticket_proof(ticket);
            if !protocol::same_secret(hello.ticket.as_bytes(), expected.as_bytes()) {
                return self.turn_away(
                    conn,
                    peer,
                    "refused: the migration's ticket is not the one this destination was \
                     started with"
                        .into(),
                );
            }
            if self.ticket_spent.swap(true, Ordering::AcqRel) {
                return self.turn_away(
                    conn,
                    peer,
                    "refused: this destination's one-time ticket was already used".into(),
                );
            }
        }
        {
            let mut phase = lock(&self.phase);
            match *phase {
                Phase::Waiting => *phase = Phase::Receiving,
                Phase::Receiving => {
                    return self.turn_away(
                        conn,
                        peer,
                        "busy: another migration is arriving here".into(),
                    );
                }
                Phase::Arrived(_) => {
                    return self.turn_away(
                        conn,
                        peer,
                        "busy: a migrated VM already runs in this process".into(),
                    );
                }
            }
        }
        let session = match Session::new(hello.id) {
            Ok(s) => s,
            Err(e) => {
                *lock(&self.phase) = Phase::Waiting;
                return self.turn_away(conn, peer, format!("no random secret: {e}"));
            }
        };
        let (tx, rx) = mpsc::channel();
        *lock(&self.route) = Some((session, tx));
        let _log = crate::migration::log_span(&hello.traceparent).entered();
        tracing::info!("incoming migration of {:?} from {peer}", hello.name);
        let memory = lock(&self.memory).take();
        let result =
            destination::receive(conn, hello, session, &rx, &self.slot, (&self.place, memory));
        *lock(&self.route) = None;
        let failed = match result {
            Ok(()) => return *lock(&self.phase) = Phase::Arrived(session),
            Err(f) => f,
        };
        let e = failed.error;
        tracing::error!("incoming migration from {peer} failed: {e}; waiting for another");
        self.stop_served();
        {
            let mut c = lock(&self.counters);
            c.failed_migrations += 1;
            c.last_rejection = Some(format!("{peer}: {e}"));
        }
        *lock(&self.phase) = Phase::Waiting;
        self.preallocate();
        // Only now: the source may retry the moment it hears, and the port is free.
        if let Some(mut conn) = failed.answer {
            let _ = protocol::send(
                &mut conn,
                &Message::Abort {
                    reason: e.to_string(),
                },
            );
        }
    }

    /// Stops and drops the VM a failed or discarded migration left here, if any.
    fn stop_served(&self) {
        let served = lock(&self.slot).take();
        if let Some(vm) = served {
            vm.machine.shutdown();
        }
    }

    /// Stops and drops whatever a discarded migration left here; the port waits again.
    fn discard(&self) {
        self.stop_served();
        *lock(&self.phase) = Phase::Waiting;
        self.preallocate();
    }

    /// A source settles a handover in doubt: did it commit? Only the migration's own
    /// source can say (it names the session).
    fn resolve(&self, mut conn: Conn, peer: SocketAddr, session: Session, committed: bool) {
        if *lock(&self.phase) != Phase::Arrived(session) {
            return self.turn_away(
                conn,
                peer,
                "no handover of that migration to resolve here".into(),
            );
        }
        let Some(vm) = lock(&self.slot).clone() else {
            return self.turn_away(conn, peer, "no VM here".into());
        };
        let m = &vm.machine;
        let held = lock(&m.hold).is_some();
        let running = if !held {
            true
        } else if committed {
            *lock(&m.hold) = None;
            if let Some(copies) = lock(&vm.arrival).take() {
                copies.settle();
            }
            match m.resume() {
                Ok(()) => {
                    tracing::info!(
                        "handover resolved: the source had committed; the guest runs here"
                    );
                    true
                }
                Err(e) => {
                    tracing::error!("handover resolved as committed, but resuming failed: {e}");
                    return self.turn_away(conn, peer, format!("resuming the guest: {e}"));
                }
            }
        } else {
            false
        };
        let _ = protocol::send(&mut conn, &Message::Resolved { running });
        if !running {
            tracing::warn!(
                "handover resolved: the source kept the VM; this copy is discarded and the \
                 port waits for another migration"
            );
            drop(vm);
            self.discard();
        }
    }
}
