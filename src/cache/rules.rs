//! Pull-through rules and routing: which upstream serves a repository, and
//! under which local name its content is cached.

use crate::oci::RepoName;
use crate::upstream::UpstreamClient;

/// One configured rule, with its upstream client.
pub struct Rule {
    /// `None` for the ROOT rule.
    pub prefix: Option<RepoName>,
    pub upstream: UpstreamClient,
    pub upstream_prefix: Option<RepoName>,
    pub tag_ttl: std::time::Duration,
    pub max_stale: std::time::Duration,
    /// Docker Hub: one-segment names get `library/`.
    pub docker_hub: bool,
}

/// Where a cached repository lives locally and upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub rule: usize,
    /// The repository name content is cached under.
    pub local: RepoName,
    /// The repository asked for upstream.
    pub upstream: RepoName,
}

/// Hosts that mean Docker Hub, in `?ns=` and in upstream URLs.
const DOCKER_HUB_HOSTS: &[&str] = &[
    "docker.io",
    "registry-1.docker.io",
    "index.docker.io",
    "registry.hub.docker.com",
];

pub fn is_docker_hub(host: &str) -> bool {
    DOCKER_HUB_HOSTS.contains(&host)
}

fn join(a: &RepoName, b: &str) -> Option<RepoName> {
    format!("{a}/{b}").parse().ok()
}

impl Rule {
    /// The target for `rest`, the repository path below this rule's prefix.
    pub fn target(&self, index: usize, rest: &RepoName) -> Option<Target> {
        let local = match &self.prefix {
            Some(p) => join(p, rest.as_str())?,
            None => rest.clone(),
        };
        let mut upstream = rest.clone();
        if self.docker_hub && !upstream.as_str().contains('/') {
            upstream = format!("library/{upstream}").parse().ok()?;
        }
        if let Some(p) = &self.upstream_prefix {
            upstream = join(p, upstream.as_str())?;
        }
        Some(Target {
            rule: index,
            local,
            upstream,
        })
    }

    /// Does `ns` (a registry host from containerd's `?ns=`) name this rule's upstream?
    fn serves_ns(&self, ns: &str) -> bool {
        let host = self.upstream.host();
        host == ns || (is_docker_hub(ns) && is_docker_hub(host))
    }
}

/// How a request for a repository is to be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routed {
    /// A repository hosted here (pushed content).
    Hosted,
    /// Pulled through a rule.
    Cached(Target),
    /// A mirror request (`?ns=`) for a registry no rule serves.
    UnknownNamespace,
}

/// The ordered rules.
pub struct Rules(pub Vec<Rule>);

impl Rules {
    /// Routes a read. `hosted` says whether `repo` is a known hosted
    /// repository: hosted repositories always win, over ROOT and over a
    /// mirror request's `?ns=` (pushes under a prefix are refused, so no
    /// prefixed name is ever hosted).
    pub fn route(&self, repo: &RepoName, ns: Option<&str>, hosted: bool) -> Routed {
        if hosted {
            return Routed::Hosted;
        }
        if let Some(ns) = ns {
            return self
                .0
                .iter()
                .enumerate()
                .find(|(_, r)| r.serves_ns(ns))
                .and_then(|(i, r)| r.target(i, repo))
                .map_or(Routed::UnknownNamespace, Routed::Cached);
        }
        if let Some(t) = self.by_prefix(repo) {
            return Routed::Cached(t);
        }
        match self.0.iter().position(|r| r.prefix.is_none()) {
            Some(i) => self.0[i]
                .target(i, repo)
                .map_or(Routed::Hosted, Routed::Cached),
            None => Routed::Hosted,
        }
    }

    /// The prefixed rule `repo` falls under, if any.
    pub fn by_prefix(&self, repo: &RepoName) -> Option<Target> {
        self.0.iter().enumerate().find_map(|(i, r)| {
            let p = r.prefix.as_ref()?;
            let rest = repo.as_str().strip_prefix(p.as_str())?.strip_prefix('/')?;
            r.target(i, &rest.parse().ok()?)
        })
    }

    /// The rule a push into `repo` would violate, if any.
    pub fn forbids_push(&self, repo: &RepoName) -> Option<&Rule> {
        self.by_prefix(repo).map(|t| &self.0[t.rule])
    }
}
