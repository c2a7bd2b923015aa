//! The registry benchmark: wharf against CNCF Distribution and nginx (the
//! physical reference), on loopback, with identical content.
//!
//!     cargo bench --bench registry [-- OPTIONS]      (or benches/run.sh)
//!
//! Writes a markdown report to stdout and to `target/bench-report.md`.
//! Under `cargo test` (no `--bench` argument) it only runs its self-checks.
//! See benches/README.md for what every figure means.

mod fanout;
mod http;
mod load;
mod report;
mod scenarios;
mod servers;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use report::{Better, Check, Figure, Report, Target};
use scenarios::{LoadOpts, log, size_text};
use servers::{Kind, Server, find_program};

const USAGE: &str = "\
usage: cargo bench --bench registry -- [OPTIONS]

  --quick               smaller sizes, 3 repetitions, 2 s load runs (a few minutes)
  --reps N              repetitions of every figure (default 5; quick 3)
  --duration SECS       length of each manifest load run (default 5; quick 2)
  --connections N       connections for the manifest runs (default 64)
  --client-threads N    load generator threads (default 1, like wrk -t1)
  --chunk MIB           PATCH size of the chunked push (default 16)
  --fanout-size MIB     blob size of the pull-through fan-out (default 1024;
                        quick 64)
  --fanout-clients LIST client counts N of the fan-out (default 1,8,32)
  --only LIST           comma-separated subset of:
                        startup,blob,streams,manifest,wrk,push,fanout,hash
  --dir DIR             where to create the work folder (default: the temp dir)
  --out FILE            report file (default: target/bench-report.md)
  --wharf-bin PATH      benchmark this wharf binary instead of the one cargo
                        built (e.g. another branch's release build)
  --keep                keep the work folder (servers' data, configs and logs)
  --hold                seed the servers, print their addresses and wait
                        for Enter (for profiling by hand)
";

const SCENARIOS: [&str; 8] = [
    "startup", "blob", "streams", "manifest", "wrk", "push", "fanout", "hash",
];

struct Opts {
    quick: bool,
    reps: usize,
    big: u64,
    small: u64,
    streams: usize,
    chunk: usize,
    hash_size: usize,
    fanout_size: u64,
    fanout_clients: Vec<usize>,
    load: LoadOpts,
    settle: Duration,
    only: Option<Vec<String>>,
    dir: Option<PathBuf>,
    out: Option<PathBuf>,
    wharf_bin: Option<PathBuf>,
    keep: bool,
    hold: bool,
}

impl Opts {
    fn parse(args: &[String]) -> anyhow::Result<Opts> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Opts {
            quick,
            reps: if quick { 3 } else { 5 },
            big: if quick { 256 << 20 } else { 1 << 30 },
            small: if quick { 16 << 20 } else { 64 << 20 },
            streams: 16,
            chunk: 16 << 20,
            hash_size: if quick { 64 << 20 } else { 256 << 20 },
            fanout_size: if quick { 64 << 20 } else { 1 << 30 },
            fanout_clients: vec![1, 8, 32],
            load: LoadOpts {
                connections: 64,
                duration: Duration::from_secs(if quick { 2 } else { 5 }),
                warmup: Duration::from_millis(if quick { 500 } else { 1000 }),
                client_threads: 1,
            },
            settle: Duration::from_millis(if quick { 500 } else { 1000 }),
            only: None,
            dir: None,
            out: None,
            wharf_bin: None,
            keep: false,
            hold: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--bench" | "--quick" => {}
                "--reps" => o.reps = value(a)?.parse().context("--reps")?,
                "--duration" => {
                    o.load.duration =
                        Duration::from_secs_f64(value(a)?.parse().context("--duration")?)
                }
                "--connections" => {
                    o.load.connections = value(a)?.parse().context("--connections")?
                }
                "--client-threads" => {
                    o.load.client_threads = value(a)?.parse().context("--client-threads")?
                }
                "--chunk" => o.chunk = value(a)?.parse::<usize>().context("--chunk")? << 20,
                "--fanout-size" => {
                    o.fanout_size = value(a)?.parse::<u64>().context("--fanout-size")? << 20
                }
                "--fanout-clients" => {
                    o.fanout_clients = value(a)?
                        .split(',')
                        .map(|n| n.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--fanout-clients")?
                }
                "--only" => {
                    let list: Vec<String> = value(a)?.split(',').map(str::to_string).collect();
                    for s in &list {
                        anyhow::ensure!(SCENARIOS.contains(&s.as_str()), "unknown scenario {s:?}");
                    }
                    o.only = Some(list);
                }
                "--dir" => o.dir = Some(value(a)?.into()),
                "--out" => o.out = Some(value(a)?.into()),
                "--wharf-bin" => o.wharf_bin = Some(value(a)?.into()),
                "--keep" => o.keep = true,
                "--hold" => o.hold = true,
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                // Filters and flags that cargo or libtest conventions pass.
                other if other.starts_with('-') => anyhow::bail!("unknown option {other}\n{USAGE}"),
                _ => {}
            }
        }
        anyhow::ensure!(o.reps >= 1, "--reps must be at least 1");
        anyhow::ensure!(o.chunk > 0, "--chunk must be at least 1");
        anyhow::ensure!(o.fanout_size > 0, "--fanout-size must be at least 1");
        anyhow::ensure!(
            !o.fanout_clients.is_empty() && !o.fanout_clients.contains(&0),
            "--fanout-clients needs client counts of at least 1"
        );
        Ok(o)
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|l| l.iter().any(|s| s == scenario))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test` builds and runs bench targets without `--bench`.
        http::self_check();
        report::self_check();
        servers::self_check();
        scenarios::self_check();
        println!(
            "registry bench: self-checks passed (run `cargo bench --bench registry` to benchmark)"
        );
        return ExitCode::SUCCESS;
    }
    match Opts::parse(&args).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `target/`, from this binary's place in `target/<profile>/deps/`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn targets() -> Vec<Target> {
    vec![
        Target {
            what: "Warm blob GET",
            figure_ids: vec![("blob1", "1 stream"), ("blob16", "16 streams")],
            check: Check::RatioAtLeast(Kind::Nginx, 1.0),
            threshold_text: "≥ 1.0× nginx",
        },
        Target {
            what: "Manifest GET by tag, req/s",
            figure_ids: vec![("manifest_get_tag_rps", "")],
            check: Check::RatioAtLeast(Kind::Distribution, 5.0),
            threshold_text: "≥ 5× Distribution",
        },
        Target {
            what: "Push",
            figure_ids: vec![("push_mono", "monolithic"), ("push_chunked", "chunked")],
            check: Check::RatioAtLeast(Kind::Distribution, 1.0),
            threshold_text: "≥ 1.0× Distribution",
        },
        Target {
            what: "Pull-through cold fan-out, upstream GETs of the blob",
            figure_ids: vec![
                ("fanout1_gets", "N = 1"),
                ("fanout8_gets", "N = 8"),
                ("fanout32_gets", "N = 32"),
            ],
            check: Check::EveryRepWithin(1.0, 1.0),
            threshold_text: "= 1 in every repetition",
        },
        Target {
            what: "Pull-through cold fan-out, cold wall / warm wall",
            figure_ids: vec![
                ("fanout1_ratio", "N = 1"),
                ("fanout8_ratio", "N = 8"),
                ("fanout32_ratio", "N = 32"),
            ],
            check: Check::AtMost(1.25),
            threshold_text: "≤ 1.25",
        },
        Target {
            what: "Pull-through cold fan-out, peak RSS",
            figure_ids: vec![("fanout32_rss", "N = 32")],
            check: Check::EveryRepWithin(0.0, 64.0),
            threshold_text: "≤ 64 MiB in every repetition",
        },
        Target {
            what: "Pull-through cold fan-out, clients with a wrong or incomplete body",
            figure_ids: vec![
                ("fanout1_failed", "N = 1"),
                ("fanout8_failed", "N = 8"),
                ("fanout32_failed", "N = 32"),
            ],
            check: Check::EveryRepWithin(0.0, 0.0),
            threshold_text: "0 in every repetition",
        },
        Target {
            what: "Idle RSS",
            figure_ids: vec![("idle_rss", "")],
            check: Check::Below(20.0),
            threshold_text: "< 20 MiB",
        },
        Target {
            what: "Start-to-ready",
            figure_ids: vec![("start_ms", "")],
            check: Check::Below(100.0),
            threshold_text: "< 100 ms",
        },
    ]
}

/// Adds a scenario's peak RSS and CPU time to the resource figures.
fn add_usage(
    peaks: &mut Vec<Figure>,
    cpu: &mut Vec<Figure>,
    id: &str,
    label: &str,
    u: scenarios::Usage,
) {
    let mut p = Figure::new(
        &format!("peak_{id}"),
        &format!("Peak RSS during: {label}"),
        "MiB",
        Better::Lower,
        1,
    );
    let mut c = Figure::new(
        &format!("cpu_{id}"),
        &format!("Server CPU time during: {label}"),
        "s",
        Better::Lower,
        2,
    );
    for (k, peak, secs) in u.per {
        p.push(k, peak);
        c.push(k, secs);
    }
    peaks.push(p);
    cpu.push(c);
}

fn run(o: Opts) -> anyhow::Result<()> {
    let wharf_bin = o
        .wharf_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wharf")));
    anyhow::ensure!(
        wharf_bin.is_file(),
        "no wharf binary at {}",
        wharf_bin.display()
    );
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for tool in ["docker-registry", "nginx", "sha256sum"] {
        anyhow::ensure!(
            find_program(tool).is_some(),
            "{tool} is not installed; benches/run.sh installs what the harness needs"
        );
    }
    let have_wrk = find_program("wrk").is_some();

    let base = o.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("wharf-bench-")
        .tempdir_in(&base)
        .context("creating the work folder")?;
    log(format!("work folder: {}", work.path().display()));

    let mut rep = Report {
        quick: o.quick,
        ..Report::default()
    };
    rep.header = report::machine(work.path(), &wharf_bin, o.wharf_bin.is_some(), manifest_dir);
    rep.header.push((
        "Mode".to_string(),
        format!(
            "{}: {} repetitions per figure; blobs 1 × {} and {} × {}; manifest runs of {:.0} s \
             after a {:.1} s warm-up, {} load-generator thread(s); pull-through fan-out of 1 × {} \
             to N = {} clients",
            if o.quick {
                "quick (indicative only)"
            } else {
                "full"
            },
            o.reps,
            size_text(o.big),
            o.streams,
            size_text(o.small),
            o.load.duration.as_secs_f64(),
            o.load.warmup.as_secs_f64(),
            o.load.client_threads,
            size_text(o.fanout_size),
            o.fanout_clients
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ));

    let mut servers: Vec<Server> = Kind::ALL
        .iter()
        .map(|&k| Server::configure(k, work.path(), &wharf_bin))
        .collect::<anyhow::Result<_>>()?;
    for s in &mut servers {
        s.start()?;
        log(format!("{} on {}", s.name(), s.url()));
    }
    let mut content = scenarios::seed(&servers, o.big, o.small, o.streams)?;

    if o.hold {
        println!(
            "Servers are up, with identical content (repository {}):",
            scenarios::REPO
        );
        for s in &servers {
            println!(
                "  {:<13} {}  pid {:?}  folder {}",
                s.name(),
                s.url(),
                s.pids(),
                s.dir.display()
            );
        }
        println!("  manifest      {}", content.manifest_path(false));
        println!("  big blob      {}", content.big.path());
        println!("Press Enter (or close standard input) to stop the servers and clean up.");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        for s in &mut servers {
            s.stop();
        }
        return Ok(());
    }

    if o.wants("startup") {
        log("start-to-ready and idle RSS");
        let (ready, idle) = scenarios::startup(&mut servers, o.reps, o.settle)?;
        rep.resources.push(ready);
        rep.resources.push(idle);
    }

    let all: Vec<&Server> = servers.iter().collect();
    let registries: Vec<&Server> = servers.iter().filter(|s| s.kind.is_registry()).collect();
    let mut peaks = Vec::new();
    let mut cpu = Vec::new();

    if o.wants("blob") {
        log("warm blob GET, one stream");
        let (f, u) = scenarios::tracked(&all, || scenarios::blob_single(&all, &content, o.reps));
        let f = f?;
        add_usage(&mut peaks, &mut cpu, "blob1", &f.label, u);
        rep.figures.push(f);
    }
    if o.wants("streams") {
        log(format!("warm blob GET, {} streams", o.streams));
        let (f, u) = scenarios::tracked(&all, || scenarios::blob_streams(&all, &content, o.reps));
        let f = f?;
        add_usage(&mut peaks, &mut cpu, "blob16", &f.label, u);
        rep.figures.push(f);
    }
    if o.wants("manifest") {
        let mut notes = Vec::new();
        let (f, u) = scenarios::tracked(&all, || {
            scenarios::manifests(&all, &content, o.reps, &o.load, &mut notes)
        });
        rep.figures.extend(f?);
        rep.notes.extend(notes);
        add_usage(
            &mut peaks,
            &mut cpu,
            "manifest",
            "manifest GET and HEAD (all four runs)",
            u,
        );
    }
    if o.wants("wrk") {
        if have_wrk {
            log("manifest GET by tag, wrk cross-check");
            let mut notes = Vec::new();
            let f = scenarios::wrk_cross_check(&all, &content, o.reps, &o.load, &mut notes)?;
            rep.figures.extend(f);
            rep.notes.extend(notes);
        } else {
            rep.notes
                .push("wrk is not installed: the wrk cross-check was skipped.".to_string());
        }
    }
    if o.wants("push") {
        let (f, u) = scenarios::tracked(&registries, || {
            scenarios::push(&registries, &mut content.big_data, o.reps, o.chunk)
        });
        rep.figures.extend(f?);
        add_usage(
            &mut peaks,
            &mut cpu,
            "push",
            "push (monolithic and chunked)",
            u,
        );
    }
    if o.wants("fanout") {
        log(format!(
            "pull-through cold fan-out, N = {:?} × {}",
            o.fanout_clients,
            size_text(o.fanout_size)
        ));
        let mut notes = Vec::new();
        let x = fanout::run(
            work.path(),
            &wharf_bin,
            &fanout::FanoutOpts {
                size: o.fanout_size,
                clients: o.fanout_clients.clone(),
                reps: o.reps,
            },
            &mut notes,
        )?;
        rep.fanout = Some(x);
        rep.notes.extend(notes);
    }
    if o.wants("hash") {
        log("sha256: wharf's hasher against sha256sum");
        let n = o.hash_size.min(content.big_data.len());
        rep.hashing = Some(scenarios::hashing(
            &content.big_data[..n],
            work.path(),
            o.reps,
        )?);
    }

    std::thread::sleep(o.settle);
    let mut end = Figure::new(
        "end_rss",
        "RSS at the end, idle after all scenarios",
        "MiB",
        Better::Lower,
        1,
    );
    for s in &servers {
        end.push(s.kind, s.rss_kib() as f64 / 1024.0);
    }
    if let Some(mib) = end.median(Kind::Wharf).filter(|&m| m >= 20.0) {
        rep.notes.push(format!(
            "wharf's idle RSS after the scenarios is {mib:.1} MiB: at or above the 20 MiB \
             target, which the table checks on the idle RSS after start."
        ));
    }
    rep.resources.extend(peaks);
    rep.resources.push(end);
    rep.resources.extend(cpu);

    rep.notes.push(
        "nginx serves the same bytes as plain files with sendfile (the physical reference); \
         it takes no pushes. The RSS of nginx is the sum over its master and worker processes."
            .to_string(),
    );
    rep.notes.push(
        "Push: wharf fsyncs every chunk and the blob before answering; Distribution 2.8 \
         does not fsync. `sync` runs before every push so neither pays for the other's \
         dirty pages."
            .to_string(),
    );
    rep.notes.push(
        "Load generator: closed loop (each connection has one request in flight), \
         keep-alive, Accept header as containerd sends it. Latencies include queueing \
         behind the other connections."
            .to_string(),
    );

    let text = rep.render(&targets());
    println!("{text}");
    let out = o
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-report.md"));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    log(format!("report written to {}", out.display()));

    for s in &mut servers {
        s.stop();
    }
    drop(servers);
    if o.keep {
        log(format!("work folder kept: {}", work.keep().display()));
    }
    Ok(())
}
