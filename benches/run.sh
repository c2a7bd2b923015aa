#!/usr/bin/env bash
# The benchmark harness in one command. Installs what wharf is compared
# against when it is missing (Debian's docker-registry, nginx and wrk),
# builds release wharf, runs the criterion micro benches, then the registry
# comparison, whose markdown report goes to stdout and target/bench-report.md.
#
#   benches/run.sh                  # full run
#   benches/run.sh --quick          # smaller sizes, fewer repetitions
#   benches/run.sh --no-micro       # skip the criterion micro benches
#   benches/run.sh --only push,hash # any other option goes to the registry
#                                   # bench: see `--help` there
#
# See benches/README.md for what every figure means.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'benches/run.sh: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

micro=true
quick=false
args=()
for arg in "$@"; do
    case "$arg" in
        --no-micro) micro=false ;;
        --quick) quick=true; args+=("$arg") ;;
        -h | --help)
            sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0 ;;
        *) args+=("$arg") ;;
    esac
done

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found (install a Rust toolchain)"

# command:package; nginx lives in sbin, which a non-root PATH may lack.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
missing=()
for entry in docker-registry:docker-registry nginx:nginx wrk:wrk sha256sum:coreutils; do
    have "${entry%%:*}" || missing+=("${entry#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi

log "cargo build --release"
cargo build --release

if $micro; then
    log "micro benches (criterion)"
    if $quick; then
        cargo bench --bench micro -- --warm-up-time 1 --measurement-time 2
    else
        cargo bench --bench micro
    fi
fi

log "registry comparison"
cargo bench --bench registry -- "${args[@]}"
