//! Prometheus metrics, served at `/metrics` in the text exposition format.
//!
//! Each component owns the handles it updates (cheap atomic counters);
//! [`Metrics::new`] registers them all once, under the `wharf_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::cache::Cache;

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
        cache: Option<&Cache>,
        replication: Option<&crate::replication::ReplicationMetrics>,
        hot: Option<&crate::storage::hot::HotMetrics>,
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
        if let Some(cache) = cache {
            let c = &cache.counters;
            r.register(
                "cache_hits",
                "Requests answered from the cache, by kind",
                c.hits.clone(),
            );
            r.register(
                "cache_misses",
                "Requests that went to upstream, by kind",
                c.misses.clone(),
            );
            r.register(
                "cache_revalidations",
                "Tags past tag_ttl revalidated with upstream",
                c.revalidations.clone(),
            );
            r.register(
                "cache_stale_serves",
                "Answers served from the cache because upstream was failing",
                c.stale_serves.clone(),
            );
            let f = &cache.fills.counters;
            r.register(
                "cache_fills",
                "Upstream blob fetches started",
                f.started.clone(),
            );
            r.register(
                "cache_coalesced_waiters",
                "Blob requests that joined a fetch already in progress",
                f.coalesced.clone(),
            );
            r.register(
                "cache_fill_failures",
                "Blob fetches that failed (nothing stored)",
                f.failed.clone(),
            );
            r.register(
                "cache_fill_corrupt",
                "Blob fetches whose content did not match the digest (nothing stored)",
                f.corrupt.clone(),
            );
            r.register(
                "cache_fills_followed",
                "Blob fetches served from another replica's fill over the bucket (no upstream request)",
                f.followed.clone(),
            );
            r.register(
                "upstream_bytes",
                "Blob bytes received from upstreams",
                f.upstream_bytes.clone(),
            );
            let b = &cache.budget.metrics;
            r.register(
                "cache_size_bytes",
                "Bytes of pulled-through blobs stored",
                b.size_bytes.clone(),
            );
            r.register(
                "cache_blobs",
                "Pulled-through blobs stored",
                b.entries.clone(),
            );
            r.register(
                "cache_evictions",
                "Blobs evicted to keep cache.max_size",
                b.evictions.clone(),
            );
            r.register(
                "cache_evicted_bytes",
                "Bytes evicted to keep cache.max_size",
                b.evicted_bytes.clone(),
            );
        }
        if let Some(m) = replication {
            r.register(
                "replication_queue_depth",
                "Replication jobs waiting or running, by destination",
                m.queue_depth.clone(),
            );
            r.register(
                "replication_lag_seconds",
                "Seconds since the oldest push not yet replicated, by destination",
                m.lag_seconds.clone(),
            );
            r.register(
                "replication_bytes_sent",
                "Blob bytes sent to replication destinations",
                m.bytes_sent.clone(),
            );
            r.register(
                "replication_failures",
                "Failed replication attempts, by destination",
                m.failures.clone(),
            );
            r.register(
                "replication_completed",
                "Replication jobs completed, by destination",
                m.completed.clone(),
            );
        }
        if let Some(h) = hot {
            r.register(
                "hot_tier_hits",
                "Blob reads served from the local hot tier",
                h.hits.clone(),
            );
            r.register(
                "hot_tier_misses",
                "Blob reads served from the bucket (then copied to the hot tier)",
                h.misses.clone(),
            );
            r.register(
                "hot_tier_evictions",
                "Copies dropped from the hot tier to keep its size",
                h.evictions.clone(),
            );
            r.register(
                "hot_tier_rejected",
                "Copies into the hot tier that did not match their digest (nothing kept)",
                h.rejected.clone(),
            );
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
