//! Prometheus metrics (prometheus-client); the admin port that serves them is `admin`.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub op: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    pub sink: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

/// Every metric pacsgate exports. Label values come from fixed sets, never from the wire.
pub struct Metrics {
    registry: Registry,
    pub associations: Family<OutcomeLabels, Counter>,
    pub active: Gauge,
    pub operations: Family<OperationLabels, Counter>,
    pub refusals: Family<RuleLabels, Counter>,
    pub bytes: Family<DirectionLabels, Counter>,
    pub tls_handshake_failures: Counter,
    pub upstream_connect_failures: Family<UpstreamLabels, Counter>,
    pub association_setup_seconds: Histogram,
    pub find_seconds: Histogram,
    pub reloads: Family<OutcomeLabels, Counter>,
    pub audit_failures: Family<AuditLabels, Counter>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pacsgate");
        let m = Metrics {
            associations: Family::default(),
            active: Gauge::default(),
            operations: Family::default(),
            refusals: Family::default(),
            bytes: Family::default(),
            tls_handshake_failures: Counter::default(),
            upstream_connect_failures: Family::default(),
            association_setup_seconds: Histogram::new(latency_buckets()),
            find_seconds: Histogram::new(latency_buckets()),
            reloads: Family::default(),
            audit_failures: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "associations",
            "Associations by outcome and reason",
            m.associations.clone(),
        );
        registry.register(
            "associations_active",
            "Associations being relayed now",
            m.active.clone(),
        );
        registry.register(
            "operations",
            "DIMSE operations by type and status class",
            m.operations.clone(),
        );
        registry.register(
            "refusals",
            "Operations and associations refused, by rule",
            m.refusals.clone(),
        );
        registry.register("bytes", "Bytes relayed, by direction", m.bytes.clone());
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed connections to an archive or destination",
            m.upstream_connect_failures.clone(),
        );
        registry.register(
            "association_setup_seconds",
            "From accept to the A-ASSOCIATE-AC sent to the client (TLS, authentication, upstream)",
            m.association_setup_seconds.clone(),
        );
        registry.register(
            "find_seconds",
            "C-FIND from request to final response",
            m.find_seconds.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads by outcome (reason: what asked for it, sighup)",
            m.reloads.clone(),
        );
        registry.register(
            "audit_failures",
            "Audit events lost, by sink (file: a line could not be written; syslog: not delivered)",
            m.audit_failures.clone(),
        );
        // Counters an alert watches exist at 0 from start-up, so that the alert has a series.
        for sink in ["file", "syslog"] {
            let _ = m.audit_failures.get_or_create(&AuditLabels { sink });
        }
        for outcome in ["ok", "refused"] {
            let _ = m.reloads.get_or_create(&OutcomeLabels {
                outcome,
                reason: "sighup",
            });
        }
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String only fails on a fmt::Error from the String, which does not happen.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn operation(&self, op: &'static str, status: Option<u16>) {
        self.operations
            .get_or_create(&OperationLabels {
                op,
                status: status_class(status),
            })
            .inc();
    }

    /// Create the `upstream_connect_failures` series (at 0) of every archive, C-MOVE destination and
    /// DICOMweb upstream `config` names, so that each has a series before its first failure.
    pub fn prepare_upstreams(&self, config: &crate::config::Config) {
        let addresses = config
            .upstreams
            .iter()
            .map(|u| &u.address)
            .chain(config.destinations.iter().map(|d| &d.address))
            .chain(config.http.iter().map(|h| &h.upstream));
        for address in addresses {
            let _ = self
                .upstream_connect_failures
                .get_or_create(&UpstreamLabels {
                    upstream: address.clone(),
                });
        }
    }

    pub fn refusal(&self, rule: &'static str) {
        self.refusals.get_or_create(&RuleLabels { rule }).inc();
    }
}

/// The class of a DIMSE status, a bounded label (PS3.7 C.1).
pub fn status_class(status: Option<u16>) -> &'static str {
    match status {
        None => "none",
        Some(0x0000) => "success",
        Some(0xFF00 | 0xFF01) => "pending",
        Some(0xFE00) => "cancel",
        Some(0x0001 | 0x0107 | 0x0116) => "warning",
        Some(s) if s & 0xF000 == 0xB000 => "warning",
        Some(_) => "failure",
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_up_in_the_exposition() {
        let m = metrics();
        m.operation("find", Some(0xA700));
        m.refusal("query_guard");
        m.associations
            .get_or_create(&OutcomeLabels {
                outcome: "rejected",
                reason: "not_authenticated",
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("pacsgate_operations_total{op=\"find\",status=\"failure\"}"),
            "{text}"
        );
        assert!(text.contains("pacsgate_refusals_total{rule=\"query_guard\"}"));
        assert!(text.contains("# TYPE pacsgate_association_setup_seconds histogram"));
        assert_eq!(status_class(Some(0xB000)), "warning");
    }
}
