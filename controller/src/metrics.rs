//! The controller's metrics (SPEC §12), in the Prometheus text format under `serve --http`
//! (or `http` in controller.toml): agents connected by environment, stagings and releases
//! by outcome, staging bytes and durations, rollouts by state, sessions, the chunk store.
//! Counters move as things happen; gauges are read from the fleet and the store at each
//! scrape.

use crate::server::Controller;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Env {
    pub env: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Channel {
    pub channel: String,
}

type U64Gauge = Gauge<u64, AtomicU64>;

/// A gauge of things in progress: [`InProgress::track`] counts one until its guard drops.
#[derive(Clone, Default)]
pub struct InProgress(Gauge);

impl InProgress {
    pub fn track(&self) -> impl Drop {
        struct Guard(Gauge);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.0.inc();
        Guard(self.0.clone())
    }
}

pub struct Metrics {
    registry: Registry,
    pub stagings: Family<Outcome, Counter>,
    pub releases: Family<Outcome, Counter>,
    pub staging_bytes: Histogram,
    pub staging_seconds: Histogram,
    /// Connections refused because too many handshakes were in flight.
    pub handshakes_refused: Counter,
    /// Connections waiting for a handshake slot.
    pub handshakes_queued: Gauge,
    /// Chunk streams being served, and waiting for a slot (`fetch_streams`).
    pub fetch_streams_serving: InProgress,
    pub fetch_streams_waiting: InProgress,
    /// Chunk streams that found every slot taken and waited.
    pub fetch_streams_queued: Counter,
    agents_connected: Family<Env, U64Gauge>,
    agents: Family<Env, U64Gauge>,
    rollouts: Family<State, U64Gauge>,
    sessions: Family<Channel, U64Gauge>,
    chunk_store_bytes: U64Gauge,
    chunks: U64Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("stagehand");
        let stagings = Family::<Outcome, Counter>::default();
        r.register("stagings", "Stagings agents reported, by outcome", stagings.clone());
        let releases = Family::<Outcome, Counter>::default();
        r.register("releases", "Receipts of activate messages, by outcome", releases.clone());
        // 4 KiB to 64 GiB; 10 ms to about 3 hours.
        let staging_bytes = Histogram::new(exponential_buckets(4096.0, 4.0, 13));
        r.register_with_unit(
            "staging_fetched",
            "Bytes an agent fetched for one staging",
            Unit::Bytes,
            staging_bytes.clone(),
        );
        let staging_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 20));
        r.register_with_unit(
            "staging_duration",
            "One staging, as its agent timed it",
            Unit::Seconds,
            staging_seconds.clone(),
        );
        let handshakes_refused = Counter::default();
        r.register(
            "handshakes_refused",
            "Connections refused at once because the handshake queue was full or they had waited too long in it (their peers retry with backoff)",
            handshakes_refused.clone(),
        );
        let handshakes_queued = Gauge::default();
        r.register(
            "handshakes_queued",
            "Connections waiting for one of the controller's handshake slots",
            handshakes_queued.clone(),
        );
        let fetch_streams = Family::<State, Gauge>::default();
        r.register(
            "fetch_streams",
            "Chunk streams to agents: being served, or waiting for one of the controller's fetch_streams slots",
            fetch_streams.clone(),
        );
        let fetch_streams_serving = InProgress(fetch_streams.get_or_create(&State { state: "serving".into() }).clone());
        let fetch_streams_waiting = InProgress(fetch_streams.get_or_create(&State { state: "waiting".into() }).clone());
        let fetch_streams_queued = Counter::default();
        r.register(
            "fetch_streams_queued",
            "Chunk streams that found every fetch_streams slot taken and waited their turn",
            fetch_streams_queued.clone(),
        );
        let agents_connected = Family::<Env, U64Gauge>::default();
        r.register("agents_connected", "Agents with both channels up, by environment", agents_connected.clone());
        let agents = Family::<Env, U64Gauge>::default();
        r.register("agents", "Enrolled agents that are not revoked, by environment", agents.clone());
        let rollouts = Family::<State, U64Gauge>::default();
        r.register("rollouts", "Rollouts by state", rollouts.clone());
        let sessions = Family::<Channel, U64Gauge>::default();
        r.register("sessions", "Agent sessions open, by channel", sessions.clone());
        let chunk_store_bytes = U64Gauge::default();
        r.register_with_unit(
            "chunk_store",
            "Bytes of chunks in the artifact store",
            Unit::Bytes,
            chunk_store_bytes.clone(),
        );
        let chunks = U64Gauge::default();
        r.register("chunk_store_chunks", "Chunks in the artifact store", chunks.clone());
        Metrics {
            registry: r,
            stagings,
            releases,
            staging_bytes,
            staging_seconds,
            handshakes_refused,
            handshakes_queued,
            fetch_streams_serving,
            fetch_streams_waiting,
            fetch_streams_queued,
            agents_connected,
            agents,
            rollouts,
            sessions,
            chunk_store_bytes,
            chunks,
        }
    }
}

impl Metrics {
    /// The text exposition, with the gauges read now.
    pub fn render(&self, ctl: &Controller) -> String {
        if let Ok(agents) = ctl.store.agents() {
            let mut envs: std::collections::BTreeMap<String, (u64, u64)> = std::collections::BTreeMap::new();
            for a in agents.iter().filter(|a| !a.revoked) {
                let e = envs.entry(a.env.clone()).or_default();
                e.0 += 1;
                e.1 += u64::from(ctl.connected(&a.id));
            }
            for (env, (all, up)) in envs {
                self.agents.get_or_create(&Env { env: env.clone() }).set(all);
                self.agents_connected.get_or_create(&Env { env }).set(up);
            }
        }
        if let Ok(rollouts) = ctl.store.rollouts() {
            let mut states: std::collections::BTreeMap<&'static str, u64> =
                ["running", "paused", "rolling-back", "succeeded", "failed", "aborted"]
                    .into_iter()
                    .map(|s| (s, 0))
                    .collect();
            for r in &rollouts {
                *states.entry(r.state.name()).or_default() += 1;
            }
            for (state, n) in states {
                self.rollouts.get_or_create(&State { state: state.into() }).set(n);
            }
        }
        let (deploy, release) = ctl.fleet.session_counts();
        self.sessions.get_or_create(&Channel { channel: "deploy".into() }).set(deploy as u64);
        self.sessions.get_or_create(&Channel { channel: "release".into() }).set(release as u64);
        if let Ok(chunks) = ctl.chunks.chunk_digests() {
            self.chunks.set(chunks.len() as u64);
            self.chunk_store_bytes.set(chunks.iter().map(|(_, len)| len).sum());
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
