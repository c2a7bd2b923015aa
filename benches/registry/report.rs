//! Statistics, the description of the machine, and the markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use crate::servers::Kind;

/// Median, minimum and maximum of a set of repetitions.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One measured quantity, per server, every repetition.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Stable key, used by the targets.
    pub id: String,
    pub label: String,
    pub unit: &'static str,
    pub better: Better,
    /// Decimals to print.
    pub decimals: usize,
    pub values: BTreeMap<Kind, Vec<f64>>,
}

impl Figure {
    pub fn new(
        id: &str,
        label: &str,
        unit: &'static str,
        better: Better,
        decimals: usize,
    ) -> Figure {
        Figure {
            id: id.to_string(),
            label: label.to_string(),
            unit,
            better,
            decimals,
            values: BTreeMap::new(),
        }
    }
    pub fn push(&mut self, k: Kind, v: f64) {
        self.values.entry(k).or_default().push(v);
    }
    pub fn stats(&self, k: Kind) -> Option<Stats> {
        Stats::of(self.values.get(&k)?)
    }
    pub fn median(&self, k: Kind) -> Option<f64> {
        self.stats(k).map(|s| s.median)
    }
    /// Ratio of medians `a / b`.
    pub fn ratio(&self, a: Kind, b: Kind) -> Option<f64> {
        let (x, y) = (self.median(a)?, self.median(b)?);
        (y != 0.0).then_some(x / y)
    }
    /// The unit with an arrow for the better direction.
    fn unit_cell(&self) -> String {
        match self.better {
            Better::Higher => format!("{} ↑", self.unit),
            Better::Lower => format!("{} ↓", self.unit),
        }
    }
    fn cell(&self, k: Kind) -> String {
        cell(
            self.values.get(&k).map(Vec::as_slice).unwrap_or(&[]),
            self.decimals,
        )
    }
}

/// Two measurements of the same thing by different tools.
pub struct Pair {
    pub label: String,
    pub unit: &'static str,
    pub decimals: usize,
    pub a: (&'static str, Vec<f64>),
    pub b: (&'static str, Vec<f64>),
}

/// `median (min–max)`.
fn cell(values: &[f64], decimals: usize) -> String {
    match Stats::of(values) {
        None => "—".to_string(),
        Some(s) if s.n == 1 => fmt(s.median, decimals),
        Some(s) => format!(
            "{} ({}–{})",
            fmt(s.median, decimals),
            fmt(s.min, decimals),
            fmt(s.max, decimals)
        ),
    }
}

pub fn fmt(x: f64, decimals: usize) -> String {
    format!("{x:.decimals$}")
}

/// `12.5 MiB`, `1.20×`, `3` (no unit).
fn with_unit(value: String, unit: &str) -> String {
    match unit {
        "" => value,
        "×" => format!("{value}×"),
        _ => format!("{value} {unit}"),
    }
}

fn ratio_cell(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{r:.2}×"),
        None => "—".to_string(),
    }
}

/// Which way a target compares.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    /// ratio of medians wharf / other ≥ threshold
    RatioAtLeast(Kind, f64),
    /// wharf's median < threshold
    Below(f64),
    /// wharf's median ≤ threshold
    AtMost(f64),
    /// every repetition of wharf's figure within `[low, high]`
    EveryRepWithin(f64, f64),
}

pub struct Target {
    pub what: &'static str,
    /// Figures it applies to, each with a short name for the table.
    pub figure_ids: Vec<(&'static str, &'static str)>,
    pub check: Check,
    pub threshold_text: &'static str,
}

/// The figures of the pull-through cold fan-out for one client count N,
/// per contender: each a table row of the fan-out section.
pub struct FanoutRow {
    pub clients: usize,
    /// Upstream GETs (and HEADs) of the blob during the cold round.
    pub gets: Figure,
    pub heads: Figure,
    /// Until the last client has its last byte.
    pub cold: Figure,
    pub warm: Figure,
    /// median(cold) / median(warm): one value per contender.
    pub ratio: Figure,
    /// Time to first byte over the N clients of a cold round: p50, max.
    pub ttfb_p50: Figure,
    pub ttfb_max: Figure,
    /// Peak RSS and CPU time of the contender during the cold round.
    pub rss: Figure,
    pub cpu: Figure,
    /// Clients whose body was not the blob (status, length or digest),
    /// cold and warm rounds together.
    pub failed: Figure,
}

impl FanoutRow {
    pub fn figures(&self) -> [&Figure; 10] {
        [
            &self.gets,
            &self.heads,
            &self.cold,
            &self.warm,
            &self.ratio,
            &self.ttfb_p50,
            &self.ttfb_max,
            &self.rss,
            &self.cpu,
            &self.failed,
        ]
    }
}

/// The pull-through cold fan-out section.
pub struct Fanout {
    /// What was measured and how, printed above the table.
    pub intro: String,
    /// The contenders, in table order.
    pub servers: Vec<Kind>,
    pub rows: Vec<FanoutRow>,
}

#[derive(Default)]
pub struct Report {
    pub header: Vec<(String, String)>,
    pub figures: Vec<Figure>,
    /// Resource figures (start-to-ready, RSS, CPU), in table order.
    pub resources: Vec<Figure>,
    pub hashing: Option<Pair>,
    pub fanout: Option<Fanout>,
    pub notes: Vec<String>,
    pub quick: bool,
}

impl Report {
    pub fn figure(&self, id: &str) -> Option<&Figure> {
        let fanout = self
            .fanout
            .iter()
            .flat_map(|x| x.rows.iter().flat_map(FanoutRow::figures));
        self.figures
            .iter()
            .chain(self.resources.iter())
            .chain(fanout)
            .find(|f| f.id == id)
    }

    pub fn render(&self, targets: &[Target]) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# wharf benchmark report\n");
        for (k, v) in &self.header {
            let _ = writeln!(out, "- **{k}:** {v}");
        }
        let _ = writeln!(
            out,
            "\nEach cell is the median of the repetitions, with the minimum and maximum in \
             parentheses. The servers take turns within every round (A B C, B C A, ...). \
             Ratios are ratios of medians; ↑ marks figures where higher is better, ↓ where lower is better.\n"
        );

        if !self.figures.is_empty() {
            let _ = writeln!(out, "## Throughput and latency\n");
            let _ = writeln!(
                out,
                "| scenario | unit | wharf | Distribution | nginx | wharf/nginx | wharf/Distribution |"
            );
            let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
        }
        for f in &self.figures {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.label,
                f.unit_cell(),
                f.cell(Kind::Wharf),
                f.cell(Kind::Distribution),
                f.cell(Kind::Nginx),
                ratio_cell(f.ratio(Kind::Wharf, Kind::Nginx)),
                ratio_cell(f.ratio(Kind::Wharf, Kind::Distribution)),
            );
        }

        if let Some(x) = &self.fanout {
            if !out.ends_with("\n\n") {
                out.push('\n');
            }
            let _ = writeln!(out, "## Pull-through cache, cold fan-out\n");
            let _ = writeln!(out, "{}\n", x.intro);
            let columns: Vec<String> = x
                .rows
                .first()
                .map(|r| {
                    r.figures()
                        .iter()
                        .map(|f| {
                            if f.unit.is_empty() {
                                format!("{} {}", f.label, f.unit_cell().trim())
                            } else {
                                format!("{} ({})", f.label, f.unit_cell())
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let _ = writeln!(out, "| N | server | {} |", columns.join(" | "));
            let _ = writeln!(out, "|---:|---|{}", "---:|".repeat(columns.len()));
            for r in &x.rows {
                for &k in &x.servers {
                    let cells: Vec<String> = r.figures().iter().map(|f| f.cell(k)).collect();
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} |",
                        r.clients,
                        k.name(),
                        cells.join(" | ")
                    );
                }
            }
        }
        let _ = writeln!(out, "\n## Resources\n");
        let _ = writeln!(out, "| figure | unit | wharf | Distribution | nginx |");
        let _ = writeln!(out, "|---|---|---:|---:|---:|");
        for f in &self.resources {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                f.label,
                f.unit_cell(),
                f.cell(Kind::Wharf),
                f.cell(Kind::Distribution),
                f.cell(Kind::Nginx),
            );
        }

        if let Some(p) = &self.hashing {
            let _ = writeln!(out, "\n## Digest hashing\n");
            let _ = writeln!(out, "| figure | unit | {} | {} | ratio |", p.a.0, p.b.0);
            let _ = writeln!(out, "|---|---|---:|---:|---:|");
            let ratio = match (Stats::of(&p.a.1), Stats::of(&p.b.1)) {
                (Some(a), Some(b)) if b.median != 0.0 => Some(a.median / b.median),
                _ => None,
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                p.label,
                p.unit,
                cell(&p.a.1, p.decimals),
                cell(&p.b.1, p.decimals),
                ratio_cell(ratio),
            );
        }

        let _ = writeln!(out, "\n## Targets\n");
        if self.quick {
            let _ = writeln!(
                out,
                "Quick mode: smaller sizes and fewer repetitions, so these verdicts are \
                 indicative only.\n"
            );
        }
        let _ = writeln!(out, "| target | threshold | measured | verdict |");
        let _ = writeln!(out, "|---|---|---:|---|");
        let mut missed = Vec::new();
        for t in targets {
            for (id, short) in &t.figure_ids {
                let label = if short.is_empty() {
                    t.what.to_string()
                } else {
                    format!("{}, {short}", t.what)
                };
                let Some(f) = self.figure(id) else {
                    let _ = writeln!(out, "| {label} | {} | — | not measured |", t.threshold_text);
                    continue;
                };
                let (measured, ok) = match t.check {
                    Check::RatioAtLeast(other, min) => match f.ratio(Kind::Wharf, other) {
                        Some(r) => (format!("{r:.2}× {}", other.name()), Some(r >= min)),
                        None => ("—".to_string(), None),
                    },
                    Check::Below(max) => match f.median(Kind::Wharf) {
                        Some(v) => (with_unit(fmt(v, f.decimals), f.unit), Some(v < max)),
                        None => ("—".to_string(), None),
                    },
                    Check::AtMost(max) => match f.median(Kind::Wharf) {
                        Some(v) => (with_unit(fmt(v, f.decimals), f.unit), Some(v <= max)),
                        None => ("—".to_string(), None),
                    },
                    Check::EveryRepWithin(low, high) => match f.stats(Kind::Wharf) {
                        Some(s) => {
                            let range = if s.min == s.max {
                                fmt(s.min, f.decimals)
                            } else {
                                format!("{}–{}", fmt(s.min, f.decimals), fmt(s.max, f.decimals))
                            };
                            (
                                with_unit(range, f.unit),
                                Some(s.min >= low && s.max <= high),
                            )
                        }
                        None => ("—".to_string(), None),
                    },
                };
                let verdict = match ok {
                    Some(true) => "met".to_string(),
                    Some(false) => {
                        missed.push(label.clone());
                        "**MISSED**".to_string()
                    }
                    None => "not measured".to_string(),
                };
                let _ = writeln!(
                    out,
                    "| {label} | {} | {measured} | {verdict} |",
                    t.threshold_text
                );
            }
        }
        if missed.is_empty() {
            let _ = writeln!(out, "\nEvery measured target was met.");
        } else {
            let _ = writeln!(
                out,
                "\n**Missed targets ({}):** {}.",
                missed.len(),
                missed.join("; ")
            );
        }

        if !self.notes.is_empty() {
            let _ = writeln!(out, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }
}

// ---- the machine ----

fn first_line_of(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// The first line of a command's standard output, if it succeeded.
fn output_if_ok(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The filesystem type holding `dir` (longest matching mount point).
fn filesystem_of(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = read("/proc/mounts");
    let mut best: Option<(usize, String, String)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        if dir.starts_with(f[1]) && best.as_ref().is_none_or(|b| f[1].len() > b.0) {
            best = Some((f[1].len(), f[2].to_string(), f[0].to_string()));
        }
    }
    match best {
        Some((_, fs, dev)) => format!("{fs} ({dev})"),
        None => "unknown".to_string(),
    }
}

/// Date, machine and software versions, as `(key, value)` lines.
/// `foreign_bin`: the wharf binary was given with `--wharf-bin`, so the
/// source tree's git state does not describe it.
pub fn machine(
    work: &Path,
    wharf_bin: &Path,
    foreign_bin: bool,
    manifest_dir: &Path,
) -> Vec<(String, String)> {
    let mut h = Vec::new();
    let date = first_line_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    h.push(("Date".to_string(), date));

    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_else(|| "unknown OS".to_string());
    h.push((
        "Machine".to_string(),
        format!("{model}, {cores} cores, {mem_gib:.1} GiB RAM; {os}; Linux {kernel}"),
    ));
    h.push(("Storage".to_string(), filesystem_of(work)));
    h.push((
        "Load average at start".to_string(),
        read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    ));

    let git = output_if_ok(
        "git",
        &[
            "-C",
            &manifest_dir.display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = Command::new("git")
        .args([
            "-C",
            &manifest_dir.display().to_string(),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ])
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    let wharf = format!(
        "wharf {}{}",
        first_line_of(&wharf_bin.display().to_string(), &["--version"])
            .map(|v| v.trim_start_matches("wharf ").to_string())
            .unwrap_or_default(),
        match git {
            _ if foreign_bin =>
                format!(" (binary given with --wharf-bin: {})", wharf_bin.display()),
            Some(g) => format!(
                " (git {g}{})",
                if dirty { ", uncommitted changes" } else { "" }
            ),
            None => String::new(),
        }
    );
    let mut sw = vec![wharf];
    if let Some(v) = first_line_of("rustc", &["-V"]) {
        sw.push(v);
    }
    if let Some(v) = first_line_of("docker-registry", &["--version"]) {
        sw.push(format!(
            "Distribution {}",
            v.split_whitespace().last().unwrap_or("?")
        ));
    }
    if let Some(v) = crate::servers::find_program("nginx")
        .and_then(|p| first_line_of(&p.display().to_string(), &["-v"]))
    {
        sw.push(v.replace("nginx version: ", ""));
    }
    if let Some(v) = first_line_of("wrk", &["-v"]) {
        sw.push(v.split_whitespace().take(2).collect::<Vec<_>>().join(" "));
    }
    h.push(("Software".to_string(), sw.join("; ")));
    h
}

/// Checks run by `cargo test`.
pub fn self_check() {
    let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
    assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
    let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
    assert_eq!(s.median, 2.5);
    assert!(Stats::of(&[]).is_none());
    let mut f = Figure::new("x", "x", "MiB/s", Better::Higher, 0);
    f.push(Kind::Wharf, 10.0);
    f.push(Kind::Nginx, 5.0);
    assert_eq!(f.ratio(Kind::Wharf, Kind::Nginx), Some(2.0));
    assert_eq!(f.ratio(Kind::Wharf, Kind::Distribution), None);
    assert_eq!(with_unit("1.20".into(), "×"), "1.20×");
    assert_eq!(with_unit("3".into(), ""), "3");
    assert_eq!(with_unit("12.5".into(), "MiB"), "12.5 MiB");

    // The fan-out section and its targets.
    let fig = |id: &str, values: &[(Kind, f64)]| {
        let mut f = Figure::new(id, id, "", Better::Lower, 0);
        for &(k, v) in values {
            f.push(k, v);
        }
        f
    };
    let w = |v: f64| [(Kind::Wharf, v), (Kind::Distribution, 9.0)];
    let row = FanoutRow {
        clients: 8,
        gets: fig("fanout8_gets", &[(Kind::Wharf, 1.0), (Kind::Wharf, 2.0)]),
        heads: fig("fanout8_heads", &w(0.0)),
        cold: fig("fanout8_cold", &w(2.0)),
        warm: fig("fanout8_warm", &w(2.0)),
        ratio: fig("fanout8_ratio", &w(1.0)),
        ttfb_p50: fig("fanout8_ttfb_p50", &w(1.0)),
        ttfb_max: fig("fanout8_ttfb_max", &w(1.0)),
        rss: fig("fanout8_rss", &w(30.0)),
        cpu: fig("fanout8_cpu", &w(1.0)),
        failed: fig("fanout8_failed", &w(0.0)),
    };
    let rep = Report {
        fanout: Some(Fanout {
            intro: "intro".to_string(),
            servers: vec![Kind::Wharf, Kind::Distribution],
            rows: vec![row],
        }),
        ..Report::default()
    };
    let target = |id, check| Target {
        what: "t",
        figure_ids: vec![(id, "")],
        check,
        threshold_text: "x",
    };
    let text = rep.render(&[
        target("fanout8_gets", Check::EveryRepWithin(1.0, 1.0)),
        target("fanout8_ratio", Check::AtMost(1.25)),
        target("fanout32_gets", Check::EveryRepWithin(1.0, 1.0)),
    ]);
    assert!(text.contains("| 8 | wharf | 2 (1–2) | 0 |"), "{text}");
    assert!(text.contains("| 8 | Distribution | — | 9 |"), "{text}");
    assert!(text.contains("| t | x | 1–2 | **MISSED** |"), "{text}");
    assert!(text.contains("| t | x | 1 | met |"), "{text}");
    assert!(text.contains("| t | x | — | not measured |"), "{text}");
}
