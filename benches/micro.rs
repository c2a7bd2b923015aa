//! Micro benchmarks (criterion): digest hashing against `sha256sum` on the
//! same bytes, route parsing and manifest parsing.
//!
//!     cargo bench --bench micro [-- FILTER]

use std::hint::black_box;
use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wharf::oci::{Algorithm, Digest, Manifest, Route};

const HASH_INPUT: usize = 64 << 20;

fn data(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

fn digest(c: &mut Criterion) {
    let bytes = data(HASH_INPUT);
    let expected = Digest::sha256_of(&bytes);
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(&bytes).expect("write temp file");
    file.flush().expect("flush temp file");
    let path = file.path().to_path_buf();

    let mut g = c.benchmark_group("sha256 of 64 MiB");
    g.throughput(Throughput::Bytes(HASH_INPUT as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    for (name, piece) in [
        ("wharf, 512 KiB updates", 512 << 10),
        ("wharf, 16 KiB updates", 16 << 10),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut h = Algorithm::Sha256.hasher();
                for p in bytes.chunks(piece) {
                    h.update(black_box(p));
                }
                let d = h.finish();
                assert_eq!(d, expected);
                d
            })
        });
    }
    // The same bytes from a page-cached file, process start included
    // (about a millisecond, under 2% of the run).
    g.bench_function("sha256sum (page-cached file)", |b| {
        b.iter(|| {
            let out = Command::new("sha256sum")
                .arg(&path)
                .output()
                .expect("run sha256sum");
            assert!(out.stdout.starts_with(expected.hex().as_bytes()));
        })
    });
    g.finish();
}

const D: &str = "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";

fn routes(c: &mut Criterion) {
    let paths = [
        ("base", "/v2/".to_string()),
        (
            "manifest by tag",
            "/v2/library/alpine/manifests/3.20".to_string(),
        ),
        (
            "manifest by digest",
            format!("/v2/library/alpine/manifests/{D}"),
        ),
        (
            "blob, nested name",
            format!("/v2/org/team/project/app/blobs/{D}"),
        ),
        (
            "upload session",
            "/v2/library/alpine/blobs/uploads/0b5c8e2a-7d1f-4c3e-9a6b-2f8d1e0c4b7a".to_string(),
        ),
        ("tags list", "/v2/library/alpine/tags/list".to_string()),
    ];
    let mut g = c.benchmark_group("route parse");
    for (name, p) in &paths {
        Route::parse(p).unwrap_or_else(|e| panic!("{p}: {e:?}"));
        g.bench_function(*name, |b| b.iter(|| Route::parse(black_box(p)).is_ok()));
    }
    g.finish();
    c.bench_function("digest parse", |b| {
        b.iter(|| black_box(D).parse::<Digest>().is_ok())
    });
}

fn image_manifest(layers: usize) -> String {
    let layer = |i: usize| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{:064x}","size":{}}}"#,
            i + 1,
            1000 + i
        )
    };
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{:064x}","size":1469}},"layers":[{}],"annotations":{{"org.opencontainers.image.created":"2024-01-01T00:00:00Z"}}}}"#,
        0xc0ffee,
        (0..layers).map(layer).collect::<Vec<_>>().join(",")
    )
}

fn index(platforms: usize) -> String {
    let arch = [
        "amd64", "arm64", "arm", "ppc64le", "s390x", "386", "riscv64", "mips64le",
    ];
    let entry = |i: usize| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{:064x}","size":1024,"platform":{{"architecture":"{}","os":"linux"}}}}"#,
            i + 1,
            arch[i % arch.len()]
        )
    };
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        (0..platforms).map(entry).collect::<Vec<_>>().join(",")
    )
}

fn manifests(c: &mut Criterion) {
    let cases = [
        ("image, 4 layers", image_manifest(4)),
        ("image, 40 layers", image_manifest(40)),
        ("index, 8 platforms", index(8)),
    ];
    let mut g = c.benchmark_group("manifest parse");
    for (name, body) in &cases {
        Manifest::parse(body.as_bytes(), None).unwrap_or_else(|e| panic!("{name}: {e}"));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| Manifest::parse(black_box(body.as_bytes()), None).is_ok())
        });
    }
    g.finish();
}

criterion_group!(benches, digest, routes, manifests);
criterion_main!(benches);
