//! The MQTT trigger: one persistent MQTT 5 session with the broker
//! (`EDGEFAAS_MQTT_URL`), kept by one thread with a poll loop over the socket
//! and a wake pipe; the packets are mqttbytes-ng's v5 codec.
//!
//! - Each function's `topic` filters are subscribed (QoS 1), and follow
//!   installs, updates and deletes; `$share/<group>/...` filters split a topic
//!   across a fleet. The session outlives the daemon (clean start off, a day's
//!   expiry), so the broker keeps QoS 1 messages for a node that was away.
//! - A message invokes each matching function through the same path as HTTP,
//!   with the payload as body and `Mqtt_Topic`, `Mqtt_Qos`, `Mqtt_Retain`.
//! - The output goes to the message's MQTT 5 response topic (with its
//!   correlation data) or the function's `reply` topic.
//! - QoS 1: acknowledged only once every function succeeded (and its reply is
//!   spooled); a failure is retried after 1, 2, 4 ... s, `EDGEFAAS_MQTT_RETRIES`
//!   times, then published to `edgefaas/<client id>/dead/<name>` and acknowledged.
//! - Publishes go through a bounded spool on disk and are sent in order,
//!   within the broker's receive maximum; reconnects back off to 30 s.

mod spool;
mod transport;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use log::{debug, info, warn};
use mqttbytes_ng::QoS;
use mqttbytes_ng::v5::{
    Connect, ConnectProperties, Disconnect, DisconnectReasonCode, Filter, Login, Packet, PingReq,
    PubAck, Publish, PublishProperties, RetainForwardRule, Subscribe, SubscribeProperties,
    Unsubscribe,
};

use crate::admission::Refused;
use crate::app::App;
use crate::events::{self, Event};
use crate::http::Answer;
use crate::name::FunctionName;
pub use spool::private_file;
pub use transport::Endpoint;
use transport::Transport;

/// How the daemon talks to its broker.
#[derive(Clone, Debug)]
pub struct Settings {
    pub endpoint: Endpoint,
    pub ca: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
    pub spool_bytes: u64,
    pub retries: u32,
    pub max_body: u64,
}

const KEEP_ALIVE: Duration = Duration::from_secs(30);
const SESSION_EXPIRY: u32 = 24 * 3600;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The first line of `.spool/subscriptions`.
/// The confirmed subscriptions (each with its identifier), in `.spool`.
const SUBSCRIPTIONS: &str = "subscriptions.v2";
/// A connection up this long resets the reconnect backoff.
const STABLE: Duration = Duration::from_secs(10);
/// Messages in progress at most; past it QoS 0 messages are dropped (and
/// counted): QoS 1 ones are bounded by the receive maximum.
const MAX_MESSAGES: usize = 1024;
/// A message the node was too busy to run (lane full, queue timeout) tries again after this.
const BUSY_RETRY: Duration = Duration::from_millis(250);
/// How many messages the broker may send us unacknowledged.
const RECEIVE_MAX: u16 = 64;

enum Cmd {
    /// A function's topics may have changed; `ack` is told once the broker
    /// confirmed the (un)subscriptions (at once when there is nothing to do).
    Topics(Option<mpsc::Sender<()>>),
    /// One function's run for one message ended.
    Done {
        msg: u64,
        function: FunctionName,
        result: Result<Answer, Refused>,
    },
    Stop,
}

/// The daemon's handle on the session thread.
pub struct Mqtt {
    tx: Mutex<mpsc::Sender<Cmd>>,
    wake: OwnedFd,
    connected: Arc<AtomicBool>,
    spooled: Arc<AtomicUsize>,
}

impl Mqtt {
    /// Opens the spool and starts the session thread (it connects, and keeps reconnecting).
    pub fn start(app: Arc<App>, settings: Settings) -> Result<Arc<Mqtt>, String> {
        let tls = if settings.endpoint.tls {
            Some(transport::tls_config(settings.ca.as_deref())?)
        } else {
            None
        };
        let dir = app.store.dir().join(".spool");
        let spool = spool::Spool::open(&dir, settings.spool_bytes)
            .map_err(|e| format!("cannot open the MQTT spool {}: {e}", dir.display()))?;
        let read_list = |name: &str| -> Option<BTreeSet<String>> {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            // Only filters: a line that is not one (a header an earlier build
            // wrote) would be sent to the broker, which drops the connection over it.
            Some(
                text.lines()
                    .filter(|l| valid_filter(l))
                    .map(str::to_string)
                    .collect(),
            )
        };
        // `subscriptions` is the list of a release that subscribed without
        // identifiers (it is left for a rollback): what it holds and no function
        // wants is unsubscribed, and what is wanted is subscribed once more, with them.
        let (subscribed, legacy) = match read_list(SUBSCRIPTIONS) {
            Some(list) => (list, None),
            None => (BTreeSet::new(), read_list("subscriptions")),
        };
        let (wake_r, wake_w) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )
        .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let mqtt = Arc::new(Mqtt {
            tx: Mutex::new(tx),
            wake: wake_w,
            connected: Arc::default(),
            spooled: Arc::new(AtomicUsize::new(spool.len())),
        });
        let mut session = Session {
            handle: Arc::downgrade(&mqtt),
            connected: mqtt.connected.clone(),
            spooled: mqtt.spooled.clone(),
            app,
            settings,
            tls,
            spool,
            spool_dir: dir,
            conn: None,
            buf: BytesMut::new(),
            next_pkid: 0,
            inflight: HashMap::new(),
            queue: VecDeque::new(),
            receive_max: 20,
            messages: HashMap::new(),
            by_pkid: HashMap::new(),
            next_msg: 0,
            retries: Vec::new(),
            unsent_acks: Vec::new(),
            acked_on_resume: BTreeSet::new(),
            routes: Vec::new(),
            subscribed,
            awaiting: BTreeMap::new(),
            waiters: Vec::new(),
            last_sent: Instant::now(),
            last_heard: Instant::now(),
            connected_at: Instant::now(),
            unspooled: Vec::new(),
            refused: BTreeSet::new(),
            previous: HashMap::new(),
            broker_max_packet: None,
            backoff: Duration::from_millis(250),
            next_connect: Instant::now(),
        };
        session.routes = session.wanted_routes().unwrap_or_default();
        match legacy {
            Some(legacy) => {
                let wanted: BTreeSet<String> = session.routes.iter().map(|r| r.0.clone()).collect();
                session.subscribed = legacy.difference(&wanted).cloned().collect();
            }
            // Written again as read: without a line an earlier build may have put in.
            None => session.save_subscriptions(),
        }
        std::thread::Builder::new()
            .name("mqtt".into())
            .spawn(move || session.run(&rx, wake_r))
            .map_err(|e| e.to_string())?;
        Ok(mqtt)
    }

    fn send(&self, cmd: Cmd) {
        let _ = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(cmd);
        let _ = rustix::io::write(&self.wake, &[1]);
    }

    /// Installs, updates and deletes call this: the subscriptions follow, and
    /// this waits (at most `wait`) until the broker has confirmed them, so a
    /// message published once the install answered reaches the function.
    pub fn topics_changed(&self, wait: Duration) {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Topics(Some(tx)));
        let _ = rx.recv_timeout(wait);
    }

    /// Ends the session (shutdown): unacknowledged messages come again next time.
    pub fn stop(&self) {
        self.send(Cmd::Stop);
    }

    /// Connected, and publishes spooled.
    pub fn gauges(&self) -> (bool, usize) {
        (
            self.connected.load(Ordering::Relaxed),
            self.spooled.load(Ordering::Relaxed),
        )
    }
}

/// One incoming message and the functions still working on it.
struct Message {
    pkid: u16,
    qos: QoS,
    topic: String,
    payload: Bytes,
    retain: bool,
    response: Option<(String, Option<Bytes>)>,
    /// Function -> failed runs so far.
    pending: HashMap<FunctionName, u32>,
    /// False when the session it came in was lost: its ack would mean nothing.
    ackable: bool,
}

/// A publish waiting for room on disk, for one function's run of a message.
struct Unspooled {
    at: Instant,
    msg: u64,
    function: FunctionName,
    topic: String,
    payload: Bytes,
    correlation: Option<Bytes>,
    qos: QoS,
}

struct Session {
    handle: std::sync::Weak<Mqtt>,
    connected: Arc<AtomicBool>,
    spooled: Arc<AtomicUsize>,
    app: Arc<App>,
    settings: Settings,
    tls: Option<Arc<rustls::ClientConfig>>,
    spool: spool::Spool,
    spool_dir: PathBuf,
    conn: Option<Transport>,
    buf: BytesMut,
    next_pkid: u16,
    /// Our QoS 1 publishes the broker has not acknowledged: packet id -> spool seq.
    inflight: HashMap<u16, u64>,
    /// Spooled publishes not yet sent on this connection, oldest first.
    queue: VecDeque<u64>,
    /// The broker's receive maximum.
    receive_max: usize,
    messages: HashMap<u64, Message>,
    by_pkid: HashMap<u16, u64>,
    next_msg: u64,
    retries: Vec<(Instant, u64, FunctionName)>,
    /// Acks of messages that finished while disconnected: sent if the session resumes.
    unsent_acks: Vec<u16>,
    /// Those acks, sent at the last connect: their re-sent copies (DUP) are not run again.
    acked_on_resume: BTreeSet<u16>,
    /// (filter as subscribed, filter to match topics with, function)
    routes: Vec<(String, String, FunctionName)>,
    subscribed: BTreeSet<String>,
    /// (Un)subscriptions sent and not yet confirmed, by packet id.
    /// (subscribe or unsubscribe, filter) by packet id.
    awaiting: BTreeMap<u16, (bool, String)>,
    /// Told when `awaiting` empties.
    waiters: Vec<mpsc::Sender<()>>,
    last_sent: Instant,
    last_heard: Instant,
    connected_at: Instant,
    /// Replies (or dead letters) that could not be spooled (a full disk), tried
    /// again each second; their message is acknowledged once they are.
    unspooled: Vec<Unspooled>,
    /// Filters the broker refused: not sent again until an install or a new connection.
    refused: BTreeSet<String>,
    /// A function's filters before its `topic` changed, until one of its new
    /// ones is confirmed: copies the old ones bring still run it.
    previous: HashMap<FunctionName, BTreeSet<String>>,
    /// The broker's maximum packet size (CONNACK), if it said.
    broker_max_packet: Option<u32>,
    backoff: Duration,
    next_connect: Instant,
}

impl Session {
    fn run(&mut self, rx: &mpsc::Receiver<Cmd>, wake: OwnedFd) {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        loop {
            let now = Instant::now();
            if self.conn.is_none() && now >= self.next_connect {
                match self.connect() {
                    Ok(()) => {}
                    Err(e) => {
                        warn!(
                            "MQTT: cannot reach {}:{} ({e}); again in {:?}",
                            self.settings.endpoint.host, self.settings.endpoint.port, self.backoff
                        );
                        self.next_connect = Instant::now() + self.backoff;
                        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            let mut deadline = now + Duration::from_secs(1);
            if let Some((at, _, _)) = self.retries.iter().min_by_key(|r| r.0) {
                deadline = deadline.min(*at);
            }
            if let Some(u) = self.unspooled.iter().min_by_key(|u| u.at) {
                deadline = deadline.min(u.at);
            }
            if self.conn.is_none() {
                deadline = deadline.min(self.next_connect);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let ts = Timespec {
                tv_sec: left.as_secs() as _,
                tv_nsec: left.subsec_nanos() as _,
            };
            let (sock_ready, wake_ready) = {
                let mut fds = vec![PollFd::new(&wake, PollFlags::IN)];
                if let Some(c) = &self.conn {
                    fds.push(PollFd::from_borrowed_fd(c.fd(), PollFlags::IN));
                }
                let _ = poll(&mut fds, Some(&ts));
                (
                    fds.get(1).is_some_and(|f| !f.revents().is_empty()),
                    !fds[0].revents().is_empty(),
                )
            };
            if wake_ready {
                let mut b = [0u8; 64];
                while matches!(rustix::io::read(&wake, &mut b), Ok(n) if n > 0) {}
            }
            while let Ok(cmd) = rx.try_recv() {
                match cmd {
                    Cmd::Topics(ack) => {
                        // An install may have changed what the broker allows: ask again.
                        self.refused.clear();
                        self.sync_topics();
                        if let Some(ack) = ack {
                            if self.awaiting.is_empty() {
                                let _ = ack.send(());
                            } else {
                                self.waiters.push(ack);
                            }
                        }
                    }
                    Cmd::Done {
                        msg,
                        function,
                        result,
                    } => self.done(msg, function, result),
                    Cmd::Stop => {
                        if let Some(mut c) = self.conn.take() {
                            let mut out = BytesMut::new();
                            let d = Disconnect::new(DisconnectReasonCode::NormalDisconnection);
                            if Packet::Disconnect(d).write(&mut out, None).is_ok() {
                                let _ = c.write_all(&out);
                            }
                        }
                        self.connected.store(false, Ordering::Relaxed);
                        info!("MQTT: session closed (shutdown)");
                        return;
                    }
                }
            }
            if sock_ready {
                if let Err(e) = self.read() {
                    self.lost(&e);
                }
            }
            self.fire_retries();
            self.keep_alive();
        }
    }

    /// Connects, sends CONNECT, waits for CONNACK, resubscribes, resends the spool.
    fn connect(&mut self) -> std::io::Result<()> {
        let s = &self.settings;
        let mut conn = Transport::connect(&s.endpoint, self.tls.as_ref(), Duration::from_secs(10))?;
        let properties = ConnectProperties {
            session_expiry_interval: Some(SESSION_EXPIRY),
            receive_maximum: Some(RECEIVE_MAX),
            max_packet_size: Some(self.max_packet()),
            ..ConnectProperties::new()
        };
        let connect = Connect {
            keep_alive: KEEP_ALIVE.as_secs() as u16,
            client_id: s.client_id.clone(),
            clean_start: false,
            properties: Some(properties),
        };
        let login = s
            .username
            .as_ref()
            .map(|u| Login::new(u, s.password.clone().unwrap_or_default()));
        let mut out = BytesMut::new();
        Packet::Connect(connect, None, login)
            .write(&mut out, None)
            .map_err(std::io::Error::other)?;
        conn.write_all(&out)?;
        // The CONNACK, read within the connect timeout.
        let mut buf = BytesMut::new();
        let ack = loop {
            match Packet::read(&mut buf, Some(self.max_packet())) {
                Ok(Packet::ConnAck(a)) => break a,
                Ok(other) => {
                    return Err(std::io::Error::other(format!(
                        "expected CONNACK, got {other:?}"
                    )));
                }
                Err(mqttbytes_ng::Error::InsufficientBytes(_)) => {
                    if conn.read_into(&mut buf)? == 0 {
                        return Err(std::io::Error::other("the broker closed the connection"));
                    }
                }
                Err(e) => return Err(std::io::Error::other(e)),
            }
        };
        if ack.code != mqttbytes_ng::v5::ConnectReturnCode::Success {
            return Err(std::io::Error::other(format!(
                "the broker refused: {:?}",
                ack.code
            )));
        }
        conn.set_io_timeouts(Duration::from_secs(10))?;
        self.receive_max = ack
            .properties
            .as_ref()
            .and_then(|p| p.receive_max)
            .map_or(65_535, usize::from)
            .max(1);
        self.broker_max_packet = ack.properties.as_ref().and_then(|p| p.max_packet_size);
        self.connected_at = Instant::now();
        self.buf = buf;
        self.conn = Some(conn);
        self.connected.store(true, Ordering::Relaxed);
        self.last_heard = Instant::now();
        self.last_sent = Instant::now();
        self.app.metrics.count("edgefaas_mqtt_connects_total", "");
        info!(
            "MQTT: connected to {}:{} as {} (session {})",
            self.settings.endpoint.host,
            self.settings.endpoint.port,
            self.settings.client_id,
            if ack.session_present {
                "resumed"
            } else {
                "new"
            }
        );
        if !ack.session_present {
            // The broker forgot us: nothing is subscribed, and acks of earlier messages mean nothing.
            self.subscribed.clear();
            self.save_subscriptions();
            self.by_pkid.clear();
            self.unsent_acks.clear();
            for m in self.messages.values_mut() {
                m.ackable = false;
            }
        }
        self.acked_on_resume.clear();
        self.refused.clear();
        for pkid in std::mem::take(&mut self.unsent_acks) {
            self.write(Packet::PubAck(PubAck::new(pkid, None)));
            self.acked_on_resume.insert(pkid);
        }
        self.sync_topics();
        // Everything spooled goes again, in order (duplicates are at-least-once's price).
        self.inflight.clear();
        self.queue = self.spool.entries().map(|e| e.seq).collect();
        self.pump();
        // Packets that arrived with the CONNACK are handled now, not at the next read.
        if let Err(e) = self.parse_buffered() {
            self.lost(&e);
        }
        Ok(())
    }

    fn max_packet(&self) -> u32 {
        u32::try_from(self.settings.max_body + 64 * 1024).unwrap_or(u32::MAX)
    }

    /// Drops the connection; reconnects later.
    fn lost(&mut self, why: &dyn std::fmt::Display) {
        if self.conn.take().is_some() {
            warn!("MQTT: connection lost ({why}); reconnecting");
        }
        // A connection that held a while earns a quick reconnect; one that fell at
        // once (a broker refusing something we send) backs off further each time.
        if self.connected_at.elapsed() >= STABLE {
            self.backoff = Duration::from_millis(250);
        }
        // Nothing more will be confirmed on this connection.
        self.awaiting.clear();
        for w in self.waiters.drain(..) {
            let _ = w.send(());
        }
        self.connected.store(false, Ordering::Relaxed);
        self.next_connect = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn write(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        if let Err(e) = packet.write(&mut out, None) {
            warn!("MQTT: cannot encode a packet: {e}");
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match conn.write_all(&out) {
            Ok(()) => self.last_sent = Instant::now(),
            Err(e) => self.lost(&e),
        }
    }

    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            let p = self.next_pkid;
            if p != 0 && !self.inflight.contains_key(&p) && !self.awaiting.contains_key(&p) {
                return self.next_pkid;
            }
        }
    }

    /// Reads what arrived and handles each whole packet.
    fn read(&mut self) -> std::io::Result<()> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if conn.read_into(&mut self.buf)? == 0 {
            return Err(std::io::Error::other("the broker closed the connection"));
        }
        self.last_heard = Instant::now();
        self.parse_buffered()
    }

    /// Handles every whole packet in the read buffer.
    fn parse_buffered(&mut self) -> std::io::Result<()> {
        let max = self.max_packet();
        loop {
            match Packet::read(&mut self.buf, Some(max)) {
                Ok(p) => self.handle(p),
                Err(mqttbytes_ng::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(std::io::Error::other(e)),
            }
            if self.conn.is_none() {
                return Ok(());
            }
        }
    }

    fn handle(&mut self, packet: Packet) {
        match packet {
            Packet::Publish(p) => self.incoming(p),
            Packet::PubAck(a) => {
                let reason = format!("{:?}", a.reason);
                if !reason.starts_with("Success") && !reason.starts_with("NoMatchingSubscribers") {
                    warn!("MQTT: the broker refused a publish: {reason}; dropping it");
                    self.app
                        .metrics
                        .count("edgefaas_mqtt_publishes_refused_total", "");
                }
                if let Some(seq) = self.inflight.remove(&a.pkid) {
                    self.spool.remove(seq);
                    self.spooled.store(self.spool.len(), Ordering::Relaxed);
                }
                self.pump();
            }
            Packet::SubAck(s) => {
                let ok = s
                    .return_codes
                    .iter()
                    .all(|c| format!("{c:?}").starts_with("Success"));
                if let Some((_, filter)) = self.awaiting.get(&s.pkid) {
                    if ok {
                        self.subscribed.insert(filter.clone());
                        self.save_subscriptions();
                    } else {
                        // Not subscribed: tried again at the next install or connection
                        // (not at once: a refusal stays a refusal).
                        self.refused.insert(filter.clone());
                        log::error!(
                            "MQTT: the broker refused the subscription {filter}: {:?}",
                            s.return_codes
                        );
                        self.app
                            .metrics
                            .count("edgefaas_mqtt_subscriptions_refused_total", "");
                    }
                }
                self.confirmed(s.pkid);
            }
            Packet::UnsubAck(u) => {
                if let Some((_, filter)) = self.awaiting.get(&u.pkid) {
                    self.subscribed.remove(&filter.clone());
                    self.save_subscriptions();
                }
                self.confirmed(u.pkid);
            }
            Packet::Disconnect(d) => {
                let why = format!("{:?}", d.reason_code);
                self.lost(&format!("the broker disconnected: {why}"));
                if why.contains("SessionTakenOver") {
                    log::error!(
                        "MQTT: another client connected as {} and took this session; \
                         give each node its own EDGEFAAS_MQTT_CLIENT_ID",
                        self.settings.client_id
                    );
                    self.next_connect = Instant::now() + MAX_BACKOFF;
                    self.backoff = MAX_BACKOFF;
                }
            }
            Packet::PingResp(_) => {}
            other => debug!("MQTT: ignoring {other:?}"),
        }
    }

    /// The broker confirmed an (un)subscription; those waiting for all of them learn it.
    fn confirmed(&mut self, pkid: u16) {
        self.awaiting.remove(&pkid);
        self.forget_previous();
        if self.awaiting.is_empty() {
            // Installs and deletes that came while these were pending were
            // skipped for their filters: catch up with the store now.
            self.sync_topics();
        }
        if self.awaiting.is_empty() {
            for w in self.waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// A message from the broker: run each function whose filter matches it.
    fn incoming(&mut self, p: Publish) {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        if p.qos == QoS::AtLeastOnce {
            if p.dup && self.acked_on_resume.remove(&p.pkid) {
                // Finished while we were away; acknowledged on this connection.
                return;
            }
            if let Some(old) = self.by_pkid.get(&p.pkid).copied() {
                if p.dup {
                    // Sent again while it still runs: its ack comes when it is done.
                    return;
                }
                // A new message under an id we still hold: the broker reused it
                // (a session taken over or restored). The old one's ack would
                // now acknowledge this one, so the old one is not acknowledged.
                warn!("MQTT: the broker reused packet id {}", p.pkid);
                if let Some(m) = self.messages.get_mut(&old) {
                    m.ackable = false;
                }
                self.by_pkid.remove(&p.pkid);
            }
        }
        if p.qos == QoS::AtMostOnce && self.messages.len() >= MAX_MESSAGES {
            self.app
                .metrics
                .count("edgefaas_mqtt_messages_dropped_total", "");
            return;
        }
        let props = p.properties.unwrap_or_default();
        let functions = self.route(&topic, &props.subscription_identifiers);
        if functions.is_empty() {
            debug!("MQTT: no function for {topic}");
            if p.qos == QoS::AtLeastOnce {
                self.write(Packet::PubAck(PubAck::new(p.pkid, None)));
            }
            return;
        }
        let id = self.next_msg;
        self.next_msg += 1;
        let message = Message {
            pkid: p.pkid,
            qos: p.qos,
            topic,
            // A copy: a slice would pin the whole read buffer while it runs.
            payload: Bytes::copy_from_slice(&p.payload),
            retain: p.retain,
            response: props.response_topic.map(|t| (t, props.correlation_data)),
            pending: functions.iter().map(|f| (f.clone(), 0)).collect(),
            ackable: true,
        };
        if p.qos == QoS::AtLeastOnce {
            self.by_pkid.insert(p.pkid, id);
        }
        for f in &functions {
            self.app
                .metrics
                .count("edgefaas_mqtt_messages_received_total", f.as_str());
            self.start_run(id, &message, f.clone());
        }
        self.messages.insert(id, message);
    }

    /// The functions a delivered copy of a message on `topic` runs. The broker
    /// sends one copy per matching subscription, each carrying its
    /// subscription identifiers: a function runs on the copy of the lowest
    /// identifier among its own confirmed filters that match, so overlapping
    /// filters (`a/+` and `a/#`, or `$share/g/x` next to `x`) run it once.
    /// A function none of whose matching filters is confirmed yet (a topic
    /// change in flight, a refused filter) runs on a copy that no confirmed
    /// filter owns (the one its old filter brings), and a broker without
    /// identifiers runs every function whose filter matches: at least once
    /// rather than never.
    fn route(&self, topic: &str, ids: &[usize]) -> Vec<FunctionName> {
        // Function -> lowest identifier of its matching confirmed filters (None: none confirmed).
        let mut lowest: HashMap<&FunctionName, Option<usize>> = HashMap::new();
        // Identifiers of the confirmed filters some function matches with.
        let mut owned = BTreeSet::new();
        for (filter, matching, f) in &self.routes {
            if topic_matches(topic, matching) {
                let e = lowest.entry(f).or_insert(None);
                if self.subscribed.contains(filter) {
                    let id = subscription_id(filter);
                    owned.insert(id);
                    *e = Some(e.map_or(id, |l| l.min(id)));
                }
            }
        }
        // A function without a confirmed filter runs on a copy no confirmed
        // filter owns (one of a filter being replaced), not on others' copies.
        let unowned = !ids.iter().any(|id| owned.contains(id));
        let mut functions: Vec<FunctionName> = lowest
            .into_iter()
            .filter(|(f, id)| {
                ids.is_empty()
                    || match id {
                        Some(id) => ids.contains(id),
                        None => {
                            unowned
                                || self.previous.get(*f).is_some_and(|old| {
                                    old.iter().any(|o| ids.contains(&subscription_id(o)))
                                })
                        }
                    }
            })
            .map(|(f, _)| f.clone())
            .collect();
        functions.sort();
        functions
    }

    /// Hands one function's run of a message to the invocation lane.
    fn start_run(&self, id: u64, m: &Message, function: FunctionName) {
        let qos = match m.qos {
            QoS::AtMostOnce => "0",
            QoS::AtLeastOnce => "1",
            QoS::ExactlyOnce => "2",
        };
        let env = vec![
            ("Mqtt_Topic".into(), m.topic.clone()),
            ("Mqtt_Qos".into(), qos.into()),
            (
                "Mqtt_Retain".into(),
                if m.retain { "1" } else { "0" }.into(),
            ),
        ];
        let handle = self.handle.clone();
        let f = function.clone();
        events::submit(
            &self.app,
            Event {
                name: function,
                body: m.payload.to_vec(),
                env,
            },
            Box::new(move |result| {
                if let Some(h) = handle.upgrade() {
                    h.send(Cmd::Done {
                        msg: id,
                        function: f,
                        result,
                    });
                }
            }),
        );
    }

    /// One function's run ended: reply, retry, or dead-letter; ack when all are through.
    fn done(&mut self, id: u64, function: FunctionName, result: Result<Answer, Refused>) {
        let Some(m) = self.messages.get_mut(&id) else {
            return;
        };
        match &result {
            Err(Refused::ShuttingDown) => {
                // Not run, and never acknowledged: the broker sends it again next time.
                m.pending.remove(&function);
                m.ackable = false;
            }
            Err(Refused::Full | Refused::TimedOut) => {
                // The node is busy, the function did not fail: a QoS 1 message waits
                // (the receive maximum holds the rest at the broker) and tries again
                // without spending an attempt; a QoS 0 one is dropped and counted.
                if m.qos == QoS::AtMostOnce {
                    m.pending.remove(&function);
                    self.app
                        .metrics
                        .count("edgefaas_mqtt_messages_dropped_total", "");
                } else {
                    self.retries
                        .push((Instant::now() + BUSY_RETRY, id, function));
                    return;
                }
            }
            Ok(a) if (200..300).contains(&a.status) => {
                let target = match &m.response {
                    Some((t, c)) => Some((t.clone(), c.clone())),
                    None => self
                        .app
                        .store
                        .settings(&function)
                        .reply
                        .clone()
                        .map(|t| (t, None)),
                };
                let qos = m.qos;
                self.app
                    .metrics
                    .count("edgefaas_mqtt_messages_acked_total", function.as_str());
                match target {
                    Some((topic, correlation)) => {
                        let payload: Bytes = a.body.clone().into();
                        self.publish_for(id, function, topic, payload, correlation, qos);
                    }
                    None => {
                        m.pending.remove(&function);
                    }
                }
            }
            Ok(a) => {
                let attempts = m.pending.get(&function).copied().unwrap_or(0) + 1;
                let why = String::from_utf8_lossy(&a.body).trim().to_string();
                if attempts <= self.settings.retries {
                    m.pending.insert(function.clone(), attempts);
                    let wait = Duration::from_secs(1 << (attempts - 1).min(5));
                    self.app
                        .metrics
                        .count("edgefaas_mqtt_messages_retried_total", function.as_str());
                    debug!(
                        "MQTT: {function} failed on {} ({why}); again in {wait:?}",
                        m.topic
                    );
                    self.retries.push((Instant::now() + wait, id, function));
                    return;
                }
                m.pending.remove(&function);
                let mut dead = serde_json::json!({
                    "function": function.as_str(),
                    "topic": m.topic,
                    "error": why,
                    "attempts": attempts,
                    "payload": String::from_utf8_lossy(&m.payload),
                });
                if std::str::from_utf8(&m.payload).is_err() {
                    use base64::Engine as _;
                    dead["payload_base64"] = base64::engine::general_purpose::STANDARD
                        .encode(&m.payload)
                        .into();
                }
                let topic = format!("edgefaas/{}/dead/{function}", self.settings.client_id);
                warn!(
                    "MQTT: {function} failed {attempts} times on {}; dead-lettered to {topic}",
                    m.topic
                );
                let qos = m.qos;
                self.app.metrics.count(
                    "edgefaas_mqtt_messages_dead_lettered_total",
                    function.as_str(),
                );
                let payload: Bytes = dead.to_string().into_bytes().into();
                self.publish_for(id, function, topic, payload, None, qos);
            }
        }
        self.settle(id);
    }

    /// Publishes one function's output for message `id`: once it is spooled the
    /// function is through with the message; if it cannot be (a full disk), it
    /// is tried again each second and the message waits unacknowledged.
    fn publish_for(
        &mut self,
        id: u64,
        function: FunctionName,
        topic: String,
        payload: Bytes,
        correlation: Option<Bytes>,
        qos: QoS,
    ) {
        if self.publish(&topic, payload.clone(), correlation.clone(), qos) {
            if let Some(m) = self.messages.get_mut(&id) {
                m.pending.remove(&function);
            }
        } else {
            self.unspooled.push(Unspooled {
                at: Instant::now() + Duration::from_secs(1),
                msg: id,
                function,
                topic,
                payload,
                correlation,
                qos,
            });
        }
    }

    /// Acknowledges message `id` once every function is through with it.
    fn settle(&mut self, id: u64) {
        let through = self.messages.get(&id).is_some_and(|m| m.pending.is_empty());
        if through {
            if let Some(m) = self.messages.remove(&id) {
                if m.qos == QoS::AtLeastOnce {
                    if self.by_pkid.get(&m.pkid) == Some(&id) {
                        self.by_pkid.remove(&m.pkid);
                    }
                    if m.ackable {
                        self.ack(m.pkid);
                    }
                }
            }
        }
    }

    /// Acknowledges a QoS 1 message now, or on the next connection if it resumes the session.
    fn ack(&mut self, pkid: u16) {
        if self.conn.is_some() {
            self.write(Packet::PubAck(PubAck::new(pkid, None)));
        } else {
            self.unsent_acks.push(pkid);
        }
    }

    /// Publishes through the spool: written before the message that caused it
    /// is acknowledged, sent in order within the broker's receive maximum.
    /// False only when it could not be spooled (the caller must not ack); a
    /// publish the broker would refuse (a bad topic, over its packet size) is
    /// logged and dropped, since sending it would end the session each time.
    fn publish(
        &mut self,
        topic: &str,
        payload: Bytes,
        correlation: Option<Bytes>,
        qos: QoS,
    ) -> bool {
        let qos = qos.max_one();
        if !valid_topic(topic) {
            warn!("MQTT: not publishing to {topic:?}: not a valid topic name");
            self.app
                .metrics
                .count("edgefaas_mqtt_publishes_refused_total", "");
            return true;
        }
        let properties = correlation.map(|c| PublishProperties {
            correlation_data: Some(c),
            ..PublishProperties::default()
        });
        let mut publish = Publish::new(topic, qos, payload, properties);
        if qos == QoS::AtLeastOnce {
            publish.pkid = 1; // a placeholder (counted in the size): each send gets its own id
        }
        let size = publish.size();
        if self
            .broker_max_packet
            .is_some_and(|max| size > max as usize)
        {
            warn!(
                "MQTT: not publishing {size} bytes to {topic}: over the broker's maximum packet size"
            );
            self.app
                .metrics
                .count("edgefaas_mqtt_publishes_refused_total", "");
            return true;
        }
        self.app.metrics.count("edgefaas_mqtt_publishes_total", "");
        if qos == QoS::AtMostOnce && self.conn.is_some() && self.queue.is_empty() {
            self.write(Packet::Publish(publish));
            return true;
        }
        let mut bytes = BytesMut::new();
        if let Err(e) = Packet::Publish(publish).write(&mut bytes, None) {
            warn!("MQTT: cannot encode a publish to {topic}: {e}");
            return true;
        }
        match self.spool.push(&bytes, self.conn.is_none()) {
            Ok((entry, dropped)) => {
                if dropped > 0 {
                    warn!(
                        "MQTT: the spool is full (EDGEFAAS_MQTT_SPOOL): dropped the {dropped} oldest publishes"
                    );
                    for _ in 0..dropped {
                        self.app
                            .metrics
                            .count("edgefaas_mqtt_spool_dropped_total", "");
                    }
                    let oldest = self.spool.front_seq();
                    self.queue.retain(|s| *s >= oldest);
                }
                self.queue.push_back(entry.seq);
            }
            Err(e) => {
                warn!("MQTT: cannot spool a publish to {topic}: {e}");
                return false;
            }
        }
        self.spooled.store(self.spool.len(), Ordering::Relaxed);
        self.pump();
        true
    }

    /// Sends queued publishes while the broker's receive maximum allows.
    fn pump(&mut self) {
        while self.conn.is_some() && self.inflight.len() < self.receive_max {
            let Some(seq) = self.queue.pop_front() else {
                return;
            };
            let Some(entry) = self.spool.entries().find(|e| e.seq == seq).cloned() else {
                continue;
            };
            let packet = std::fs::read(&entry.path)
                .ok()
                .and_then(|b| Packet::read(&mut BytesMut::from(&b[..]), None).ok());
            let Some(Packet::Publish(mut p)) = packet else {
                warn!(
                    "MQTT: dropping an unreadable spooled publish {}",
                    entry.path.display()
                );
                self.spool.remove(seq);
                continue;
            };
            if p.qos == QoS::AtMostOnce {
                self.write(Packet::Publish(p));
                self.spool.remove(seq);
            } else {
                p.pkid = self.pkid();
                self.inflight.insert(p.pkid, seq);
                self.write(Packet::Publish(p));
            }
            self.spooled.store(self.spool.len(), Ordering::Relaxed);
        }
    }

    fn fire_retries(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<Unspooled>, Vec<Unspooled>) = std::mem::take(&mut self.unspooled)
            .into_iter()
            .partition(|u| u.at <= now);
        self.unspooled = later;
        for u in due {
            self.publish_for(u.msg, u.function, u.topic, u.payload, u.correlation, u.qos);
            self.settle(u.msg);
        }
        let due: Vec<(u64, FunctionName)> = self
            .retries
            .iter()
            .filter(|r| r.0 <= now)
            .map(|r| (r.1, r.2.clone()))
            .collect();
        self.retries.retain(|r| r.0 > now);
        for (id, function) in due {
            if let Some(m) = self.messages.get(&id) {
                self.start_run(id, m, function);
            }
        }
    }

    fn keep_alive(&mut self) {
        if self.conn.is_none() {
            return;
        }
        if self.last_heard.elapsed() > KEEP_ALIVE * 3 / 2 {
            self.lost(&"the broker went quiet");
            return;
        }
        if self.last_sent.elapsed() >= KEEP_ALIVE / 2 {
            self.write(Packet::PingReq(PingReq));
        }
    }

    /// The (filter, matching filter, function) of every function's `topic`
    /// settings; None if the store cannot be listed.
    fn wanted_routes(&self) -> Option<Vec<(String, String, FunctionName)>> {
        let mut routes = Vec::new();
        let names = match self.app.store.list() {
            Ok(names) => names,
            Err(e) => {
                warn!("MQTT: cannot list the functions ({e}); subscriptions unchanged");
                return None;
            }
        };
        for name in names {
            for filter in &self.app.store.settings(&name).topic {
                // `$share/<group>/<filter>`: the broker splits; the filter is what matches.
                let matching = filter
                    .strip_prefix("$share/")
                    .and_then(|r| r.split_once('/'))
                    .map_or(filter.as_str(), |(_, f)| f)
                    .to_string();
                routes.push((filter.clone(), matching, name.clone()));
            }
        }
        Some(routes)
    }

    /// Subscribes the new filters and unsubscribes the gone ones; each counts
    /// (and is remembered on disk) once the broker confirmed it.
    fn sync_topics(&mut self) {
        match self.wanted_routes() {
            Some(routes) => {
                for (filter, _, f) in &self.routes {
                    if !routes.iter().any(|(g, _, h)| g == filter && h == f) {
                        self.previous
                            .entry(f.clone())
                            .or_default()
                            .insert(filter.clone());
                    }
                }
                self.routes = routes;
            }
            // The store could not be listed (EMFILE...): keep the routes we have.
            None => return,
        }
        if self.conn.is_none() {
            return;
        }
        let wanted: BTreeSet<String> = self.routes.iter().map(|r| r.0.clone()).collect();
        let pending: BTreeSet<&String> = self.awaiting.values().map(|(_, f)| f).collect();
        let new: Vec<String> = wanted
            .difference(&self.subscribed)
            .filter(|f| !pending.contains(f) && !self.refused.contains(*f))
            .cloned()
            .collect();
        let gone: Vec<String> = self
            .subscribed
            .difference(&wanted)
            .filter(|f| !pending.contains(f))
            .cloned()
            .collect();
        for filter in new {
            info!("MQTT: subscribing {filter}");
            let pkid = self.pkid();
            let mut f = Filter::new(filter.clone(), QoS::AtLeastOnce);
            // Retained messages come with a new subscription only, not again at every restart.
            f.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
            let properties = SubscribeProperties {
                id: Some(subscription_id(&filter)),
                user_properties: Vec::new(),
            };
            let mut sub = Subscribe::new(f, Some(properties));
            sub.pkid = pkid;
            self.awaiting.insert(pkid, (true, filter));
            self.write(Packet::Subscribe(sub));
        }
        for filter in gone {
            info!("MQTT: unsubscribing {filter}");
            let pkid = self.pkid();
            let mut unsub = Unsubscribe::new(filter.clone(), None);
            unsub.pkid = pkid;
            self.awaiting.insert(pkid, (false, filter));
            self.write(Packet::Unsubscribe(unsub));
        }
        self.forget_previous();
    }

    /// Drops the previous filters of a function once its new ones are settled:
    /// one is confirmed, or none is waiting for the broker any more (refused,
    /// or not sent while disconnected), or the function is gone.
    fn forget_previous(&mut self) {
        let (routes, subscribed) = (&self.routes, &self.subscribed);
        let pending: BTreeSet<&String> = self
            .awaiting
            .values()
            .filter(|(sub, _)| *sub)
            .map(|(_, f)| f)
            .collect();
        self.previous.retain(|f, _| {
            let mine: Vec<&String> = routes
                .iter()
                .filter(|(_, _, g)| g == f)
                .map(|(filter, _, _)| filter)
                .collect();
            !mine.iter().any(|m| subscribed.contains(*m))
                && mine.iter().any(|m| pending.contains(m))
        });
    }

    /// Writes the confirmed subscriptions to `.spool/subscriptions` (atomically):
    /// the next start knows what to unsubscribe and what not to subscribe again.
    fn save_subscriptions(&self) {
        let list: String = self.subscribed.iter().map(|f| format!("{f}\n")).collect();
        let tmp = self.spool_dir.join(".subscriptions.tmp");
        let path = self.spool_dir.join(SUBSCRIPTIONS);
        let written = spool::private_file(&tmp)
            .and_then(|mut f| {
                use std::io::Write as _;
                f.write_all(list.as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            warn!("MQTT: cannot write {}: {e}", path.display());
        }
    }
}

/// A filter's MQTT 5 subscription identifier (1..=268435455), stable across
/// restarts: FNV-1a of the filter.
fn subscription_id(filter: &str) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in filter.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % 0x0FFF_FFFF) as usize + 1
}

/// Whether `topic` matches `filter` (MQTT 4.7): `+` one level, `#` the rest
/// (and the parent); a topic starting with `$` is not matched by a filter
/// whose first level is a wildcard, but is by a literal one (`$aws/...`).
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// Characters MQTT topics must not hold (brokers drop the connection over
/// them): NUL and other controls, and Unicode noncharacters.
fn bad_char(c: char) -> bool {
    let n = u32::from(c);
    c.is_control() || (0xFDD0..=0xFDEF).contains(&n) || (n & 0xFFFE) == 0xFFFE
}

/// Whether `topic` may be published to: not empty, no wildcard, at most 65535
/// bytes, no control characters or noncharacters.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 65_535
        && !topic.contains(['+', '#'])
        && !topic.chars().any(bad_char)
}

/// Whether `filter` may be subscribed: `+` and `#` only as whole levels, `#`
/// last; `$share/<group>/<filter>` with a group without `/`, `+` or `#`.
pub fn valid_filter(filter: &str) -> bool {
    let plain = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, f)) if !group.is_empty() && !group.contains(['+', '#']) => f,
            _ => return false,
        },
        None => filter,
    };
    if plain.is_empty() || filter.len() > 65_535 || filter.chars().any(bad_char) {
        return false;
    }
    let levels: Vec<&str> = plain.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

trait MaxOne {
    fn max_one(self) -> QoS;
}

impl MaxOne for QoS {
    /// Publishes go at QoS 0 or 1 (exactly-once is not offered).
    fn max_one(self) -> QoS {
        match self {
            QoS::AtMostOnce => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        }
    }
}

/// The node's name for the client id: `/proc/sys/kernel/hostname`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_match_filters() {
        for (topic, filter, want) in [
            ("a/b", "a/b", true),
            ("a/b", "a/+", true),
            ("a/b", "a/#", true),
            ("a", "a/#", true),
            ("a/b/c", "a/+", false),
            ("a/b", "a/b/c", false),
            ("a/b/c", "+/+/+", true),
            ("$SYS/x", "$SYS/x", true),
            ("$SYS/x", "$SYS/+", true),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "#", false),
            ("a//b", "a/+/b", true),
        ] {
            assert_eq!(topic_matches(topic, filter), want, "{topic} vs {filter}");
        }
    }

    #[test]
    fn filters_and_topics_are_checked() {
        for good in ["a/#", "+/b", "#", "$share/g/a/+", "$SYS/#", "a//b"] {
            assert!(valid_filter(good), "{good}");
        }
        for bad in [
            "",
            "a/#/b",
            "a#",
            "a/b+",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
            "a\0b",
        ] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
        assert!(valid_topic("a/b") && valid_topic("$aws/x"));
        assert!(!valid_topic("") && !valid_topic("x/#") && !valid_topic("+"));
        for bad in ["w/\u{FFFF}", "w/\u{FDD0}", "w/\u{1FFFE}", "a\u{7f}", "a\nb"] {
            assert!(!valid_topic(bad) && !valid_filter(bad), "{bad:?}");
        }
        assert!(valid_topic("caf\u{e9}/\u{1F321}"));
    }

    #[test]
    fn subscription_ids_are_stable_and_in_range() {
        let a = subscription_id("a/#");
        assert_eq!(a, subscription_id("a/#"));
        assert_ne!(a, subscription_id("a/+"));
        for f in ["", "a", "$share/g/x", &"x".repeat(1000)] {
            assert!((1..=0x0FFF_FFFF).contains(&subscription_id(f)));
        }
    }
}
