//! Membership: SWIM failure detection and dissemination by foca, over UDP on the node's own
//! port, driven from the control plane's tokio runtime (foca does no I/O of its own). This module
//! keeps the table the ring is built from:
//!
//! - a member foca reports up is ALIVE; one it suspects is SUSPECT; one it declares down is
//!   DOWN and *stays in the ring* (hinted handoff covers it) until it has been down longer than
//!   DEAD_NODE_TIMEOUT;
//! - a member that leaves gracefully (its Leave call, then foca's leave) is out of the ring at
//!   once;
//! - a node restarted with the same ADDR comes back with a newer incarnation and takes its old
//!   place.
//!
//! Every change of the ring's node set is sent to every core as a fresh [`Ring`] copy.

use super::ring::Ring;
use crate::security::secret::{ClusterSecret, GossipOpener, GossipRefusal};
use foca::{Config, Foca, Identity, Notification, PostcardCodec, Runtime, Timer};
use rand::{rngs::SmallRng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, HashMap},
    num::{NonZeroU32, NonZeroUsize},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{net::UdpSocket, sync::mpsc};

/// A node as foca knows it: its address plus an incarnation that a restart renews.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub addr: String,
    pub incarnation: u64,
}

impl Identity for NodeIdentity {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(NodeIdentity {
            addr: self.addr.clone(),
            incarnation: self.incarnation + 1,
        })
    }

    fn addr(&self) -> String {
        self.addr.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Alive,
    Suspect,
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "ALIVE",
            MemberState::Suspect => "SUSPECT",
            MemberState::Down => "DOWN",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MemberInfo {
    pub state: MemberState,
    /// When it went down (for DEAD_NODE_TIMEOUT).
    pub down_since: Option<Instant>,
    /// It announced a graceful leave.
    pub left: bool,
    /// The incarnation the state is about: news of an older one (a node restarted on the same
    /// ADDR is a new identity, and foca may still report its previous life suspect or down
    /// after the new one is up) changes nothing.
    pub incarnation: u64,
}

/// The table the ring comes from. Pure: events in, ring membership out.
#[derive(Debug, Clone)]
pub struct MemberTable {
    me: String,
    members: BTreeMap<String, MemberInfo>,
    dead_after: Duration,
}

impl MemberTable {
    pub fn new(me: String, dead_after: Duration) -> Self {
        Self {
            me,
            members: BTreeMap::new(),
            dead_after,
        }
    }

    pub fn up(&mut self, addr: &str, incarnation: u64) {
        if addr == self.me {
            return;
        }
        if self
            .members
            .get(addr)
            .is_some_and(|m| m.incarnation > incarnation)
        {
            return;
        }
        self.members.insert(
            addr.to_string(),
            MemberInfo {
                state: MemberState::Alive,
                down_since: None,
                left: false,
                incarnation,
            },
        );
    }

    pub fn suspect(&mut self, addr: &str, incarnation: u64) {
        if let Some(m) = self.members.get_mut(addr) {
            if m.state == MemberState::Alive && incarnation >= m.incarnation {
                m.state = MemberState::Suspect;
            }
        }
    }

    pub fn down(&mut self, addr: &str, incarnation: u64, now: Instant) {
        if let Some(m) = self.members.get_mut(addr) {
            if m.state != MemberState::Down && incarnation >= m.incarnation {
                m.state = MemberState::Down;
                m.down_since = Some(now);
            }
        }
    }

    pub fn left(&mut self, addr: &str, now: Instant) {
        if addr == self.me {
            return;
        }
        let m = self.members.entry(addr.to_string()).or_insert(MemberInfo {
            state: MemberState::Down,
            down_since: Some(now),
            left: true,
            incarnation: 0,
        });
        m.state = MemberState::Down;
        m.down_since.get_or_insert(now);
        m.left = true;
    }

    /// Whether `addr` is one of the ring's nodes at `now`.
    pub fn in_ring(&self, addr: &str, now: Instant) -> bool {
        if addr == self.me {
            return true;
        }
        match self.members.get(addr) {
            None => false,
            Some(m) if m.left => false,
            Some(m) => match m.down_since {
                Some(since) if m.state == MemberState::Down => {
                    now.duration_since(since) < self.dead_after
                }
                _ => true,
            },
        }
    }

    /// The ring's nodes at `now`, sorted.
    pub fn ring_nodes(&self, now: Instant) -> Vec<String> {
        std::iter::once(self.me.clone())
            .chain(
                self.members
                    .keys()
                    .filter(|a| self.in_ring(a, now))
                    .cloned(),
            )
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// The members that are not ALIVE, as the cores rank replicas by it (one that left is DOWN).
    pub fn health(&self) -> Health {
        self.members
            .iter()
            .filter(|(_, m)| m.left || m.state != MemberState::Alive)
            .map(|(a, m)| {
                let state = if m.left { MemberState::Down } else { m.state };
                (a.clone(), state)
            })
            .collect()
    }

    pub fn members(&self) -> impl Iterator<Item = (&String, &MemberInfo)> {
        self.members.iter()
    }

    pub fn me(&self) -> &str {
        &self.me
    }
}

/// What the rest of the node sees: the table and the ring, for the Members RPC.
#[derive(Debug)]
pub struct MembershipView {
    pub table: MemberTable,
    pub ring: Ring,
}

pub type SharedView = Arc<Mutex<MembershipView>>;

/// The failure detector's view as a core holds it: members that are not ALIVE (absent = ALIVE).
pub type Health = std::collections::BTreeMap<String, MemberState>;

/// The state of `addr` in `health`.
pub fn state_of(health: &Health, addr: &str) -> MemberState {
    health.get(addr).copied().unwrap_or(MemberState::Alive)
}

/// Commands to the membership task.
pub enum MembershipCmd {
    /// A peer called Leave.
    PeerLeft(String),
    /// This node leaves: tell foca, then answer.
    Leave(tokio::sync::oneshot::Sender<()>),
}

/// Collects what foca asks for during one call.
#[derive(Default)]
struct Actions {
    sends: Vec<(NodeIdentity, Vec<u8>)>,
    timers: Vec<(Timer<NodeIdentity>, Duration)>,
    ups: Vec<(String, u64)>,
    downs: Vec<(String, u64)>,
}

impl Runtime<NodeIdentity> for Actions {
    fn notify(&mut self, n: Notification<'_, NodeIdentity>) {
        match n {
            Notification::MemberUp(id) => self.ups.push((id.addr.clone(), id.incarnation)),
            Notification::MemberDown(id) => self.downs.push((id.addr.clone(), id.incarnation)),
            Notification::Rename(_, new) => self.ups.push((new.addr.clone(), new.incarnation)),
            _ => {}
        }
    }

    fn send_to(&mut self, to: NodeIdentity, data: &[u8]) {
        self.sends.push((to, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<NodeIdentity>, after: Duration) {
        self.timers.push((event, after));
    }
}

pub struct MembershipSettings {
    pub me: String,
    pub seeds: Vec<String>,
    pub dead_after: Duration,
    pub vnodes: u32,
    pub replication_factor: usize,
    /// CLUSTER_SECRET: every datagram is sealed with it, and one that does not open is
    /// dropped and counted in `refused` (by `GossipRefusal::ALL`'s order).
    pub seal: Option<ClusterSecret>,
    pub refused: Arc<[std::sync::atomic::AtomicU64; 3]>,
}

/// How long foca's suspicion of each member has lasted, to end the ones whose timer foca
/// dropped. foca discards every pending timer when it goes through a state of its own (a
/// peer told it that it was down, during a cut; it renews its identity and reconnects), and
/// a member it suspected just before then stays SUSPECT for good: its suspect-to-down timer is
/// gone, and the member never hears that it is suspected (the gossip of it was sent into the
/// cut), so it never refutes. Seen here in about one run in four of a 2.5 s cut.
#[derive(Default)]
struct Suspicions {
    since: HashMap<(NodeIdentity, foca::Incarnation), Instant>,
}

impl Suspicions {
    /// Declares DOWN, as foca's own timer would have, every member suspected (at the same
    /// incarnation) for three times `suspect_to_down` or more. The member, if alive, learns it
    /// and rejoins under a renewed identity, which ends the suspicion everywhere.
    fn expire(
        &mut self,
        foca: &mut Foca<NodeIdentity, PostcardCodec, SmallRng, foca::NoCustomBroadcast>,
        now: Instant,
        suspect_to_down: Duration,
        actions: &mut Actions,
    ) {
        let mut current = HashMap::new();
        let mut stale = Vec::new();
        for m in foca.iter_membership_state() {
            if m.state() != foca::State::Suspect {
                continue;
            }
            let key = (m.id().clone(), m.incarnation());
            let since = self.since.get(&key).copied().unwrap_or(now);
            if now.saturating_duration_since(since) >= suspect_to_down * 3 {
                stale.push(foca::Member::new(
                    m.id().clone(),
                    m.incarnation(),
                    foca::State::Down,
                ));
            }
            current.insert(key, since);
        }
        self.since = current;
        for member in &stale {
            tracing::warn!(member = %member.id().addr, "suspicion outlived foca's timer: member down");
        }
        if !stale.is_empty() {
            let _ = foca.apply_many(stale.into_iter(), true, actions);
        }
    }
}

/// Runs membership on the current tokio runtime, forever. `on_ring` is called with every new
/// ring, `on_health` with the members' states whenever one changes (SUSPECT, DOWN, back up).
pub async fn start(
    settings: MembershipSettings,
    socket: UdpSocket,
    view: SharedView,
    mut commands: mpsc::UnboundedReceiver<MembershipCmd>,
    on_ring: impl Fn(Ring) + Send + 'static,
    on_health: impl Fn(Health) + Send + 'static,
) {
    let mut last_health = Health::new();
    let mut tell_health = move |view: &SharedView| {
        let health = view
            .lock()
            .expect("membership view lock is never poisoned")
            .table
            .health();
        if health != last_health {
            last_health = health.clone();
            on_health(health);
        }
    };
    let socket = Arc::new(socket);
    // The wall clock in microseconds: a restarted node always gets a higher incarnation.
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let me = NodeIdentity {
        addr: settings.me.clone(),
        incarnation,
    };
    let mut config = Config::new_lan(NonZeroU32::new(16).expect("non-zero"));
    // Faster detection than the WAN-ish defaults: a dead peer is DOWN within a few seconds.
    config.probe_period = Duration::from_millis(500);
    config.probe_rtt = Duration::from_millis(200);
    config.suspect_to_down_after = Duration::from_secs(2);
    let config_suspect_to_down = config.suspect_to_down_after;
    if settings.seal.is_some() {
        // The seal's bytes must fit in the same datagram.
        config.max_packet_size =
            NonZeroUsize::new(config.max_packet_size.get() - crate::security::secret::SEAL_BYTES)
                .expect("foca's LAN packet size is far above the seal's");
    }
    config.remove_down_after = Some(Duration::from_secs(15));
    config.periodic_announce = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(2),
        num_members: std::num::NonZeroUsize::new(2).expect("non-zero"),
    });
    config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(2),
        num_members: std::num::NonZeroUsize::new(2).expect("non-zero"),
    });
    let mut foca = Foca::new(
        me,
        config,
        SmallRng::seed_from_u64(incarnation),
        PostcardCodec,
    );
    let (timer_tx, mut timer_rx) = mpsc::unbounded_channel::<Timer<NodeIdentity>>();
    let mut last_nodes: Vec<String> = Vec::new();

    let apply = |actions: Actions,
                 view: &SharedView,
                 last_nodes: &mut Vec<String>,
                 socket: &Arc<UdpSocket>,
                 timer_tx: &mpsc::UnboundedSender<Timer<NodeIdentity>>| {
        for (to, data) in actions.sends {
            let socket = Arc::clone(socket);
            let data = match &settings.seal {
                Some(secret) => secret.seal(&data),
                None => data,
            };
            tokio::spawn(async move {
                let _ = socket.send_to(&data, to.addr.as_str()).await;
            });
        }
        for (timer, after) in actions.timers {
            let tx = timer_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(timer);
            });
        }
        let now = Instant::now();
        let mut v = view.lock().expect("membership view lock is never poisoned");
        for (addr, incarnation) in actions.ups {
            tracing::info!(member = %addr, incarnation, "member up");
            v.table.up(&addr, incarnation);
        }
        for (addr, incarnation) in actions.downs {
            tracing::warn!(member = %addr, incarnation, "member down");
            v.table.down(&addr, incarnation, now);
        }
        let nodes = v.table.ring_nodes(now);
        if nodes != *last_nodes {
            tracing::info!(nodes = ?nodes, "ring changed");
            let ring = Ring::new(nodes.clone(), settings.vnodes, settings.replication_factor);
            v.ring = ring.clone();
            *last_nodes = nodes;
            drop(v);
            on_ring(ring);
        }
    };

    // Suspicion is not a notification in foca's stable API: read it from the member states.
    let refresh_states =
        |foca: &Foca<NodeIdentity, PostcardCodec, SmallRng, foca::NoCustomBroadcast>,
         view: &SharedView| {
            // foca keeps every identity it knows, so a node restarted or renewed on the same
            // ADDR is listed twice, the older one suspect or down: only the newest of each
            // address speaks for it (taken one by one, the old suspect undid the new alive).
            let mut newest: HashMap<&str, (u64, foca::State)> = HashMap::new();
            for m in foca.iter_membership_state() {
                let (addr, incarnation) = (m.id().addr.as_str(), m.id().incarnation);
                let slot = newest.entry(addr).or_insert((incarnation, m.state()));
                if incarnation >= slot.0 {
                    *slot = (incarnation, m.state());
                }
            }
            let mut v = view.lock().expect("membership view lock is never poisoned");
            for (addr, (incarnation, state)) in newest {
                if state == foca::State::Suspect {
                    v.table.suspect(addr, incarnation);
                } else if state == foca::State::Alive
                    && v.table
                        .members
                        .get(addr)
                        .is_some_and(|i| i.state == MemberState::Suspect)
                {
                    v.table.up(addr, incarnation);
                }
            }
        };

    let mut actions = Actions::default();
    for seed in &settings.seeds {
        if *seed != settings.me {
            let _ = foca.announce(
                NodeIdentity {
                    addr: seed.clone(),
                    incarnation: 0,
                },
                &mut actions,
            );
        }
    }
    apply(actions, &view, &mut last_nodes, &socket, &timer_tx);
    tell_health(&view);

    let mut opener = settings.seal.clone().map(GossipOpener::new);
    let mut buf = vec![0u8; 65536];
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut suspicions = Suspicions::default();
    let mut left = false;
    loop {
        let mut actions = Actions::default();
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, _)) = r {
                    let opened = match &mut opener {
                        None => Ok(&buf[..n]),
                        Some(opener) => opener.open(&buf[..n]),
                    };
                    match opened {
                        Ok(payload) if !left => {
                            let _ = foca.handle_data(payload, &mut actions);
                        }
                        Ok(_) => {}
                        Err(refusal) => {
                            let i = GossipRefusal::ALL.iter().position(|r| *r == refusal).unwrap_or(0);
                            settings.refused[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            }
            Some(timer) = timer_rx.recv() => {
                let _ = foca.handle_timer(timer, &mut actions);
            }
            _ = tick.tick() => {
                suspicions.expire(&mut foca, Instant::now(), config_suspect_to_down, &mut actions);
                refresh_states(&foca, &view);
                // Seeds that were not up yet: keep announcing until someone answers.
                if !left && foca.num_members() == 0 {
                    for seed in &settings.seeds {
                        if *seed != settings.me {
                            let _ = foca.announce(NodeIdentity { addr: seed.clone(), incarnation: 0 }, &mut actions);
                        }
                    }
                }
            }
            Some(cmd) = commands.recv() => match cmd {
                MembershipCmd::PeerLeft(addr) => {
                    tracing::info!(member = %addr, "member left");
                    view.lock().expect("membership view lock is never poisoned").table.left(&addr, Instant::now());
                }
                MembershipCmd::Leave(done) => {
                    left = true;
                    let _ = foca.leave_cluster(&mut actions);
                    let _ = done.send(());
                }
            },
        }
        apply(actions, &view, &mut last_nodes, &socket, &timer_tx);
        tell_health(&view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_members_stay_in_the_ring_until_the_dead_timeout() {
        let t0 = Instant::now();
        let mut t = MemberTable::new("a:1".into(), Duration::from_secs(60));
        t.up("b:1", 1);
        t.up("c:1", 1);
        assert_eq!(t.ring_nodes(t0), vec!["a:1", "b:1", "c:1"]);
        t.suspect("b:1", 1);
        t.down("c:1", 1, t0);
        assert_eq!(
            t.ring_nodes(t0 + Duration::from_secs(59)),
            vec!["a:1", "b:1", "c:1"]
        );
        assert_eq!(
            t.ring_nodes(t0 + Duration::from_secs(61)),
            vec!["a:1", "b:1"]
        );
        assert_eq!(
            t.health().into_iter().collect::<Vec<_>>(),
            vec![
                ("b:1".to_string(), MemberState::Suspect),
                ("c:1".to_string(), MemberState::Down)
            ]
        );
        // Back up: in again.
        t.up("c:1", 1);
        t.up("b:1", 1);
        assert!(t.health().is_empty());
        assert_eq!(
            t.ring_nodes(t0 + Duration::from_secs(61)),
            vec!["a:1", "b:1", "c:1"]
        );
    }

    #[test]
    fn a_graceful_leave_is_out_at_once_and_a_restart_rejoins() {
        let t0 = Instant::now();
        let mut t = MemberTable::new("a:1".into(), Duration::from_secs(60));
        t.up("b:1", 1);
        t.left("b:1", t0);
        assert_eq!(t.ring_nodes(t0), vec!["a:1"]);
        t.up("b:1", 2);
        assert_eq!(t.ring_nodes(t0), vec!["a:1", "b:1"]);
        // Self is always in, and never recorded as a member.
        t.up("a:1", 1);
        t.left("a:1", t0);
        assert_eq!(t.ring_nodes(t0), vec!["a:1", "b:1"]);
    }

    #[test]
    fn news_of_a_previous_incarnation_does_not_touch_the_new_one() {
        let t0 = Instant::now();
        let mut t = MemberTable::new("a:1".into(), Duration::from_secs(60));
        t.up("b:1", 5);
        // b restarted on the same ADDR: the new identity is up before foca gives up on the
        // old one.
        t.up("b:1", 9);
        t.suspect("b:1", 5);
        t.down("b:1", 5, t0);
        t.up("b:1", 5);
        let (_, m) = t.members().next().unwrap();
        assert_eq!((m.state, m.incarnation), (MemberState::Alive, 9));
        t.down("b:1", 9, t0);
        assert_eq!(t.members().next().unwrap().1.state, MemberState::Down);
    }

    #[test]
    fn identities_renew_and_newer_wins() {
        let a = NodeIdentity {
            addr: "x:1".into(),
            incarnation: 5,
        };
        let b = a.renew().unwrap();
        assert!(b.win_addr_conflict(&a));
        assert!(!a.win_addr_conflict(&b));
    }
}
