//! wharf: an OCI registry, pull-through cache and replication daemon.
// One exception, with its justification: the mapped reads of published
// blobs in `storage::fs`.
#![deny(unsafe_code)]

pub mod api;
pub mod cache;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod oci;
pub mod registry;
pub mod replication;
pub mod storage;
pub mod upstream;

/// The dependency direction of ARCHITECTURE.md, checked: every module names
/// only the modules it may use (`crate::<module>` paths in its source).
#[cfg(test)]
mod dependency_direction {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Each module and the modules it may depend on.
    const ALLOWED: &[(&str, &[&str])] = &[
        ("oci", &[]),
        ("metrics", &[]),
        ("storage", &["oci", "metrics"]),
        ("upstream", &["oci", "metrics"]),
        ("config", &["oci"]),
        ("cache", &["oci", "metrics", "storage", "upstream"]),
        (
            "registry",
            &["oci", "metrics", "storage", "upstream", "cache"],
        ),
        (
            "replication",
            &["oci", "metrics", "storage", "upstream", "cache", "registry"],
        ),
        (
            "api",
            &[
                "oci",
                "metrics",
                "storage",
                "upstream",
                "cache",
                "registry",
                "replication",
            ],
        ),
    ];

    fn sources(path: &Path, out: &mut Vec<String>) {
        if path.is_dir() {
            for e in std::fs::read_dir(path).unwrap() {
                sources(&e.unwrap().path(), out);
            }
        } else if path.is_file() && path.extension().is_some_and(|e| e == "rs") {
            out.push(std::fs::read_to_string(path).unwrap());
        }
    }

    #[test]
    fn modules_depend_only_downward() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut violations = Vec::new();
        for (module, allowed) in ALLOWED {
            let mut files = Vec::new();
            sources(&src.join(module), &mut files);
            sources(&src.join(format!("{module}.rs")), &mut files);
            assert!(!files.is_empty(), "module {module} has no source");
            let mut used = BTreeSet::new();
            for text in &files {
                for (i, _) in text.match_indices("crate::") {
                    let name: String = text[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    used.insert(name);
                }
            }
            for u in used {
                if u != *module && !allowed.contains(&u.as_str()) {
                    violations.push(format!("{module} -> {u}"));
                }
            }
        }
        assert!(
            violations.is_empty(),
            "against the direction: {violations:?}"
        );
    }
}
