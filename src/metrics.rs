//! Prometheus metrics, served at `/metrics` in the text exposition format.
//!
//! Each component owns the handles it updates (cheap atomic counters) and
//! registers them itself ([`Report`]); [`Metrics::new`] asks every component
//! once, under the `wharf_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// A component that reports metrics: it registers the handles it updates.
/// Components implement it where they live, so this module depends on none
/// of them.
pub trait Report {
    fn register(&self, r: &mut Registry);
}

/// `kind` = `blob` or `manifest`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

pub const BLOB: KindLabels = KindLabels { kind: "blob" };
pub const MANIFEST: KindLabels = KindLabels { kind: "manifest" };

/// One upstream and the outcome of a request to it: an HTTP status, or
/// `timeout`, `connect`, `tls`, `error` when no response came.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
    pub status: String,
}

/// Requests to upstream registries, shared by every upstream client.
#[derive(Clone, Debug, Default)]
pub struct UpstreamMetrics {
    pub requests: Family<UpstreamLabels, Counter>,
    pub errors: Family<UpstreamLabels, Counter>,
}

impl UpstreamMetrics {
    /// Records one response status, or a failure without a response.
    pub fn record(&self, upstream: &str, status: Result<u16, &'static str>) {
        let (status, error) = match status {
            Ok(s) => (s.to_string(), s >= 400),
            Err(why) => (why.to_string(), true),
        };
        let labels = UpstreamLabels {
            upstream: upstream.to_string(),
            status,
        };
        self.requests.get_or_create(&labels).inc();
        if error {
            self.errors.get_or_create(&labels).inc();
        }
    }
}

/// `method` and `status` of a served request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Borrowed for the standard methods: no allocation per request.
    pub method: std::borrow::Cow<'static, str>,
    pub status: u16,
}

/// What the HTTP front counts.
#[derive(Clone, Debug, Default)]
pub struct ServerMetrics {
    pub requests: Family<RequestLabels, Counter>,
    /// Body bytes of blob and manifest responses.
    pub bytes_served: Counter,
}

/// The registry of every metric, encoded on each scrape.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(
        server: &ServerMetrics,
        upstream: &UpstreamMetrics,
        components: &[&dyn Report],
    ) -> Metrics {
        let mut r = Registry::with_prefix("wharf");
        r.register(
            "http_requests",
            "Requests served, by method and status",
            server.requests.clone(),
        );
        r.register(
            "bytes_served",
            "Body bytes of blob and manifest responses sent to clients",
            server.bytes_served.clone(),
        );
        r.register(
            "upstream_requests",
            "Requests to upstream registries, by upstream and status",
            upstream.requests.clone(),
        );
        r.register(
            "upstream_errors",
            "Failed upstream requests (status >= 400, or no response), by upstream and status",
            upstream.errors.clone(),
        );
        for c in components {
            c.register(&mut r);
        }
        Metrics { registry: r }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
