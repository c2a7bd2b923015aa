//! `wharf replication status|retry|sync`: talks to a running wharf's
//! `/_wharf/replication/...` operations API.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use http::Method;
use indicatif::{ProgressBar, ProgressStyle};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use super::cache::{call_json, client};
use crate::api::split_ref;
use crate::upstream::UpstreamClient;

#[derive(Subcommand)]
pub enum ReplicationCommand {
    /// Show replication status: IN_PROGRESS, COMPLETE or FAILED (with the
    /// reason) per image and destination.
    Status {
        /// `REPO`, `REPO:TAG` or `REPO@DIGEST`; every job when absent.
        image: Option<String>,
        #[arg(long)]
        destination: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        server: String,
    },
    /// Put FAILED jobs back into the queue.
    Retry {
        /// `REPO`, `REPO:TAG` or `REPO@DIGEST`; every failed job when absent.
        image: Option<String>,
        #[arg(long)]
        destination: Option<String>,
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        server: String,
    },
    /// Compare the source with the destinations now and replicate what is
    /// missing or different, with a progress bar.
    Sync {
        /// Only this rule (its index in the configuration, from 0).
        #[arg(long)]
        rule: Option<usize>,
        /// Only show what would be replicated.
        #[arg(long)]
        dry_run: bool,
        /// Return once enqueued, without waiting for the copies.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        server: String,
    },
}

pub async fn run(cmd: ReplicationCommand) -> anyhow::Result<()> {
    match cmd {
        ReplicationCommand::Status {
            image,
            destination,
            json,
            server,
        } => {
            status(
                &client(&server)?,
                image.as_deref(),
                destination.as_deref(),
                json,
            )
            .await
        }
        ReplicationCommand::Retry {
            image,
            destination,
            server,
        } => {
            let q = query(image.as_deref(), destination.as_deref())?;
            let v = call_json(
                &client(&server)?,
                Method::POST,
                &format!("/_wharf/replication/retry{q}"),
            )
            .await?;
            println!(
                "{} failed jobs queued again",
                v["retried"].as_u64().unwrap_or(0)
            );
            Ok(())
        }
        ReplicationCommand::Sync {
            rule,
            dry_run,
            no_wait,
            server,
        } => sync(&client(&server)?, rule, dry_run, no_wait).await,
    }
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// `?repo=&ref=&destination=` for an image argument.
fn query(image: Option<&str>, destination: Option<&str>) -> anyhow::Result<String> {
    let mut parts = Vec::new();
    if let Some(image) = image {
        if image.contains(':') || image.contains('@') {
            let (repo, reference) = split_ref(image).map_err(anyhow::Error::msg)?;
            parts.push(format!("repo={}", enc(repo.as_str())));
            parts.push(format!("ref={}", enc(&reference.to_string())));
        } else {
            let repo: crate::oci::RepoName = image
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid repository name {image:?}: {e}"))?;
            parts.push(format!("repo={}", enc(repo.as_str())));
        }
    }
    if let Some(d) = destination {
        parts.push(format!("destination={}", enc(d)));
    }
    Ok(if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    })
}

async fn status(
    client: &UpstreamClient,
    image: Option<&str>,
    destination: Option<&str>,
    raw: bool,
) -> anyhow::Result<()> {
    let q = query(image, destination)?;
    let v = call_json(
        client,
        Method::GET,
        &format!("/_wharf/replication/status{q}"),
    )
    .await?;
    if raw {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for d in v["destinations"].as_array().into_iter().flatten() {
        if let Some(why) = d["unavailable_reason"].as_str() {
            println!(
                "destination {} unavailable (next try in {:.0} s): {why}",
                d["name"].as_str().unwrap_or("?"),
                d["unavailable_for_seconds"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        println!("no replication jobs");
        return Ok(());
    }
    println!(
        "{:<12} {:<16} {:<40} {:<20} DIGEST / REASON",
        "STATUS", "DESTINATION", "REPOSITORY", "REFERENCE"
    );
    for j in &jobs {
        let s = |k: &str| j[k].as_str().unwrap_or("").to_string();
        let detail = match (s("status").as_str(), j["failure_reason"].as_str()) {
            ("FAILED", Some(r)) => r.to_string(),
            ("IN_PROGRESS", Some(r)) => format!("retrying ({} attempts): {r}", j["attempts"]),
            _ => s("digest"),
        };
        let mut reference = s("reference");
        if reference.len() > 20 {
            reference = format!("{}…", &reference[..19]);
        }
        println!(
            "{:<12} {:<16} {:<40} {:<20} {detail}",
            s("status"),
            s("destination"),
            s("repository"),
            reference
        );
    }
    Ok(())
}

async fn sync(
    client: &UpstreamClient,
    rule: Option<usize>,
    dry_run: bool,
    no_wait: bool,
) -> anyhow::Result<()> {
    let mut q = Vec::new();
    if let Some(r) = rule {
        q.push(format!("rule={r}"));
    }
    if dry_run {
        q.push("dry_run=true".to_string());
    }
    let path = if q.is_empty() {
        "/_wharf/replication/sync".to_string()
    } else {
        format!("/_wharf/replication/sync?{}", q.join("&"))
    };
    let v = call_json(client, Method::POST, &path).await?;
    let planned = v["plan"]["planned"].as_array().cloned().unwrap_or_default();
    for d in v["plan"]["unreachable"].as_array().into_iter().flatten() {
        eprintln!(
            "destination {} is unreachable; skipped",
            d.as_str().unwrap_or("?")
        );
    }
    println!(
        "compared {} repositories, {} tags: {} to replicate",
        v["plan"]["repositories"],
        v["plan"]["tags"],
        planned.len()
    );
    let key = |p: &serde_json::Value| {
        (
            p["destination"].as_str().unwrap_or("").to_string(),
            p["repository"].as_str().unwrap_or("").to_string(),
            p["reference"].as_str().unwrap_or("").to_string(),
        )
    };
    if dry_run || no_wait {
        for p in &planned {
            let (d, r, t) = key(p);
            println!("  {r}:{t} -> {d} ({})", p["reason"].as_str().unwrap_or(""));
        }
        return Ok(());
    }
    if planned.is_empty() {
        return Ok(());
    }
    let wanted: HashSet<_> = planned.iter().map(key).collect();
    let bar = ProgressBar::new(wanted.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message("replicating");
    loop {
        let v = call_json(client, Method::GET, "/_wharf/replication/status").await?;
        let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
        let mut done = 0;
        let mut failed = Vec::new();
        for j in &jobs {
            if !wanted.contains(&key(j)) {
                continue;
            }
            match j["status"].as_str() {
                Some("COMPLETE") => done += 1,
                Some("FAILED") => {
                    done += 1;
                    let (d, r, t) = key(j);
                    failed.push(format!(
                        "{r}:{t} -> {d}: {}",
                        j["failure_reason"].as_str().unwrap_or("")
                    ));
                }
                _ => {}
            }
        }
        bar.set_position(done);
        if done as usize >= wanted.len() {
            bar.finish_and_clear();
            println!("replicated {} images", wanted.len() - failed.len());
            if !failed.is_empty() {
                for f in &failed {
                    eprintln!("FAILED {f}");
                }
                bail!("{} of {} failed", failed.len(), wanted.len());
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
