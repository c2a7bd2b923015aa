//! The pull-through cold fan-out: N clients GET the same blob at once
//! through a cache whose storage is empty — wharf's pull-through cache
//! against Distribution in proxy mode, both in front of the same upstream (a
//! plain Distribution on loopback) — then the same N again, warm.
//!
//! Upstream requests are counted from the upstream's access log, so nothing
//! sits between a cache and its upstream.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::report::{Better, Fanout, FanoutRow, Figure, Stats};
use crate::scenarios::{
    Blob, REPO, fetch_blob, fill, log, seed_blob, size_text, sync, together, tracked, turns,
};
use crate::servers::{Kind, PULL_THROUGH_PREFIX, Server, Setup};

pub struct FanoutOpts {
    /// Size of the blob.
    pub size: u64,
    /// The client counts N, one table row each.
    pub clients: Vec<usize>,
    pub reps: usize,
}

/// The contenders, in turn order.
const CONTENDERS: [Kind; 2] = [Kind::Wharf, Kind::Distribution];

/// What one round of N clients saw.
struct Round {
    wall: Duration,
    /// Time to first byte of every client that got the whole blob.
    ttfb: Vec<Duration>,
    failed: usize,
    first_error: Option<String>,
}

/// N clients released together, each streaming the blob and checking its
/// sha256. Wall time runs from the release until the last client is done.
fn round(s: &Server, path: &str, blob: &Blob, n: usize) -> anyhow::Result<Round> {
    let (t0, wall, results) = together(n, |_| fetch_blob(s, path, blob, true))?;
    let mut r = Round {
        wall,
        ttfb: Vec::with_capacity(n),
        failed: 0,
        first_error: None,
    };
    for res in results {
        match res {
            Ok(got) => r.ttfb.push(got.first_byte.saturating_duration_since(t0)),
            Err(e) => {
                r.failed += 1;
                r.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Ok(r)
}

/// GETs and HEADs of `path` the upstream has logged so far, once the count
/// has stopped moving (a request is logged when its response ends).
fn upstream_requests(upstream: &Server, path: &str) -> (u64, u64) {
    let read = || (upstream.served("GET", path), upstream.served("HEAD", path));
    let mut last = read();
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stable_since.elapsed() < Duration::from_millis(300) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = read();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    last
}

/// Waits until the contender has stored the whole blob (Distribution's
/// proxy stores it in the background, possibly after its clients are done).
fn wait_stored(s: &Server, blob: &Blob, timeout: Duration) -> bool {
    let Some(file) = s.blob_file(blob.digest.hex()) else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::metadata(&file).is_ok_and(|m| m.len() == blob.size) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn row(n: usize) -> FanoutRow {
    let f = |metric: &str, label: &str, unit, better, decimals| {
        Figure::new(
            &format!("fanout{n}_{metric}"),
            label,
            unit,
            better,
            decimals,
        )
    };
    FanoutRow {
        clients: n,
        gets: f("gets", "upstream GETs", "", Better::Lower, 0),
        heads: f("heads", "upstream HEADs", "", Better::Lower, 0),
        cold: f("cold", "cold wall", "s", Better::Lower, 2),
        warm: f("warm", "warm wall", "s", Better::Lower, 2),
        ratio: f("ratio", "cold/warm", "×", Better::Lower, 2),
        ttfb_p50: f("ttfb_p50", "cold TTFB p50", "ms", Better::Lower, 1),
        ttfb_max: f("ttfb_max", "cold TTFB max", "ms", Better::Lower, 1),
        rss: f("rss", "peak RSS, cold", "MiB", Better::Lower, 1),
        cpu: f("cpu", "server CPU, cold", "s", Better::Lower, 2),
        failed: f("failed", "failed clients", "", Better::Lower, 0),
    }
}

/// Runs the scenario in `work/fanout`: starts the upstream, seeds it with
/// one random blob of `o.size`, then for every N and repetition restarts
/// each contender on empty storage and measures a cold round and a warm
/// round. Problems worth a reader's attention go to `notes`.
pub fn run(
    work: &Path,
    wharf_bin: &Path,
    o: &FanoutOpts,
    notes: &mut Vec<String>,
) -> anyhow::Result<Fanout> {
    let dir = work.join("fanout");
    let mut upstream = Server::configure_with(
        Kind::Distribution,
        dir.join("upstream"),
        wharf_bin,
        &Setup {
            access_log: true,
            ..Setup::default()
        },
    )?;
    upstream.start()?;
    log(format!(
        "fan-out: upstream Distribution on {}, seeding 1 × {}",
        upstream.url(),
        size_text(o.size)
    ));
    let blob = {
        let mut data = vec![0u8; o.size as usize];
        fill(&mut data, 7);
        seed_blob(std::slice::from_ref(&upstream), &data)?
    };
    sync();
    let upstream_path = blob.path();

    let proxy = Setup {
        upstream: Some(upstream.url()),
        ..Setup::default()
    };
    let mut contenders: Vec<Server> = CONTENDERS
        .iter()
        .map(|&k| {
            let name = match k {
                Kind::Wharf => "wharf-pull-through",
                _ => "distribution-proxy",
            };
            Server::configure_with(k, dir.join(name), wharf_bin, &proxy)
        })
        .collect::<anyhow::Result<_>>()?;
    let path_of = |k: Kind| match k {
        Kind::Wharf => format!("/v2/{PULL_THROUGH_PREFIX}/{REPO}/blobs/{}", blob.digest),
        _ => upstream_path.clone(),
    };

    let mut rows = Vec::new();
    for &n in &o.clients {
        let mut x = row(n);
        for (r, i) in turns(contenders.len(), o.reps) {
            let s = &mut contenders[i];
            let name = s.name();
            log(format!(
                "fan-out N = {n}: {name}, repetition {}/{}",
                r + 1,
                o.reps
            ));
            // Really cold: a fresh process on empty storage.
            s.stop();
            s.wipe_data()?;
            s.start()?;
            let s = &*s;
            let path = path_of(s.kind);
            sync();

            let (gets0, heads0) = upstream_requests(&upstream, &upstream_path);
            let (cold, usage) = tracked(&[s], || round(s, &path, &blob, n));
            let cold = cold?;
            if !wait_stored(s, &blob, Duration::from_secs(120)) {
                notes.push(format!(
                    "Fan-out N = {n}, {name}: the blob was not stored within 120 s after the \
                     cold round, so the warm round was not fully warm."
                ));
            }
            let (gets1, heads1) = upstream_requests(&upstream, &upstream_path);

            sync();
            let warm = round(s, &path, &blob, n)?;
            let (gets2, heads2) = upstream_requests(&upstream, &upstream_path);
            if (gets2, heads2) != (gets1, heads1) {
                notes.push(format!(
                    "Fan-out N = {n}, {name}, repetition {}: the warm round still sent {} GET(s) \
                     and {} HEAD(s) of the blob upstream.",
                    r + 1,
                    gets2 - gets1,
                    heads2 - heads1
                ));
            }

            let k = s.kind;
            x.gets.push(k, (gets1 - gets0) as f64);
            x.heads.push(k, (heads1 - heads0) as f64);
            x.cold.push(k, cold.wall.as_secs_f64());
            x.warm.push(k, warm.wall.as_secs_f64());
            let ms: Vec<f64> = cold.ttfb.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            if let Some(t) = Stats::of(&ms) {
                x.ttfb_p50.push(k, t.median);
                x.ttfb_max.push(k, t.max);
            }
            for (_, peak, cpu) in usage.per {
                x.rss.push(k, peak);
                x.cpu.push(k, cpu);
            }
            x.failed.push(k, (cold.failed + warm.failed) as f64);
            for (what, rd) in [("cold", &cold), ("warm", &warm)] {
                if rd.failed > 0 {
                    log(format!("FAILED: {} {what} client(s) of {name}", rd.failed));
                    notes.push(format!(
                        "**FAILED: fan-out N = {n}, {name}, repetition {}, {what} round: {} of \
                         {n} clients did not get the blob intact** (first error: {}).",
                        r + 1,
                        rd.failed,
                        rd.first_error.as_deref().unwrap_or("?")
                    ));
                }
            }
        }
        for k in CONTENDERS {
            if let (Some(c), Some(w)) = (x.cold.median(k), x.warm.median(k))
                && w > 0.0
            {
                x.ratio.push(k, c / w);
            }
        }
        rows.push(x);
    }
    for s in &mut contenders {
        s.stop();
        s.wipe_data()?;
    }
    upstream.stop();

    Ok(Fanout {
        intro: format!(
            "One random {size} blob in a plain Distribution on loopback (the upstream). \
             Contenders: wharf with a `[[pull_through]]` rule (prefix `{PULL_THROUGH_PREFIX}`) and \
             Distribution in proxy mode, both in front of that upstream. Before every cold \
             round the contender is restarted on empty storage. N clients, released together, \
             GET the blob through it on fresh connections, each streaming the body and checking \
             its sha256; wall time runs from the release until the last client has its last \
             byte, time to first byte (TTFB) from the release to a client's first body byte. A \
             warm round with the same N follows once the contender has stored the blob. \
             Upstream GETs and HEADs of the blob during the cold round are counted from the \
             upstream's access log; peak RSS and CPU time are the contender's during the cold \
             round. cold/warm is the ratio of the medians. {reps} repetitions, the contenders \
             taking turns.",
            size = size_text(blob.size),
            reps = o.reps,
        ),
        servers: CONTENDERS.to_vec(),
        rows,
    })
}
