//! The agent's metrics (SPEC §12), in the Prometheus text format on `metrics_listen`
//! (agent.toml): stagings and activations by outcome, activation and health-check
//! durations, bytes fetched and reused, and the disk space left under each app's root.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `staged`/`failed` for stagings; `committed`, `scheduled` or a refusal code for
    /// activations.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct App {
    pub app: String,
}

/// Every metric the agent keeps.
pub struct Metrics {
    registry: Registry,
    pub stagings: Family<Outcome, Counter>,
    pub activations: Family<Outcome, Counter>,
    pub activation_seconds: Histogram,
    pub health_check_seconds: Histogram,
    pub fetched_bytes: Counter,
    pub reused_bytes: Counter,
    disk_free: Family<App, Gauge<u64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("stagehand_agent");
        let stagings = Family::<Outcome, Counter>::default();
        registry.register("stagings", "Stagings finished, by outcome", stagings.clone());
        let activations = Family::<Outcome, Counter>::default();
        registry.register("activations", "Activate messages answered, by outcome", activations.clone());
        // 1 ms to about 2 minutes.
        let activation_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register_with_unit(
            "activation_duration",
            "From an activate message to its receipt, for those that changed something",
            Unit::Seconds,
            activation_seconds.clone(),
        );
        let health_check_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        registry.register_with_unit(
            "health_check_duration",
            "Health checks, all tries of one activation",
            Unit::Seconds,
            health_check_seconds.clone(),
        );
        let fetched_bytes = Counter::default();
        registry.register_with_unit(
            "fetched",
            "Artifact bytes fetched from the controller",
            Unit::Bytes,
            fetched_bytes.clone(),
        );
        let reused_bytes = Counter::default();
        registry.register_with_unit(
            "reused",
            "Artifact bytes taken from versions already on this host",
            Unit::Bytes,
            reused_bytes.clone(),
        );
        let disk_free = Family::<App, Gauge<u64, AtomicU64>>::default();
        registry.register_with_unit(
            "disk_free",
            "Space left for unprivileged writes on the filesystem of each app's root",
            Unit::Bytes,
            disk_free.clone(),
        );
        Metrics {
            registry,
            stagings,
            activations,
            activation_seconds,
            health_check_seconds,
            fetched_bytes,
            reused_bytes,
            disk_free,
        }
    }
}

impl Metrics {
    /// Counts a receipt by its outcome (and, when it changed something, its duration).
    pub fn receipt(&self, r: &stagehand_common::protocol::Receipt) {
        use stagehand_common::protocol::ReceiptOutcome;
        let outcome = match &r.outcome {
            ReceiptOutcome::Committed => "committed".to_string(),
            ReceiptOutcome::Scheduled { .. } => "scheduled".to_string(),
            ReceiptOutcome::Refused(why) => why.code().to_string(),
        };
        self.activations.get_or_create(&Outcome { outcome }).inc();
        if r.applied {
            self.activation_seconds.observe(r.total_us as f64 / 1e6);
        }
    }

    /// Counts a staging's outcome and bytes.
    pub fn staging(&self, outcome: &stagehand_common::protocol::StageOutcome) {
        use stagehand_common::protocol::StageOutcome;
        let name = match outcome {
            StageOutcome::Staged { fetched_bytes, reused_bytes, .. } => {
                self.fetched_bytes.inc_by(*fetched_bytes);
                self.reused_bytes.inc_by(*reused_bytes);
                "staged"
            }
            StageOutcome::Failed { .. } => "failed",
        };
        self.stagings.get_or_create(&Outcome { outcome: name.into() }).inc();
    }

    /// The text exposition, with the disk space of each app's root measured now.
    pub fn render(&self, layout: &crate::host::Layout) -> String {
        for app in layout.apps() {
            let root = layout.app_root(&app);
            // The root, or the nearest directory above it that exists.
            let dir = root.ancestors().find(|d| d.is_dir()).map(std::path::Path::to_path_buf);
            if let Some(Ok(st)) = dir.map(|d| rustix::fs::statvfs(&d)) {
                self.disk_free.get_or_create(&App { app }).set(st.f_bavail.saturating_mul(st.f_frsize));
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
