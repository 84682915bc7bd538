#!/usr/bin/env bash
# Runs every check and test of the project on a fresh Debian machine:
# installs redis-server and Postgres when missing (the integration tests
# start their own servers on free ports), then format, lint, unit,
# integration, doc and UI tests, the documentation and the packages.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server for the integration tests, redis-cli (redis-tools) to watch
# their commands, openssl to make the TLS test's certificates.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# Postgres for redis-cached-pg: its tests start their own server (initdb in
# a temporary directory, wal_level=logical); libpq-dev to build its client.
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
[ -e /usr/include/postgresql/libpq-fe.h ] || missing+=(libpq-dev)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The package may start a system server on 6379; the tests never use it.
redis-server --version

cargo fmt --all -- --check
# The demo service (examples/demo) is checked on its own: built with the
# workspace, its `metrics` feature would be switched on for every test.
cargo clippy --workspace --exclude demo --all-targets --locked -- -D warnings
cargo clippy -p redis-cached-runtime --all-features --all-targets --locked -- -D warnings
# Unit, integration, trybuild and doc tests (benchmarks are type-checked by
# clippy above and run with `cargo bench`).
cargo test --workspace --exclude demo --locked
# Models of the near tier's fill/invalidate/lease protocol and of the
# merged lookups' queue: loom runs them over every interleaving of a few
# threads (up to 3 preemptions), with the crate's own locks and atomics
# swapped for loom's. A build of its own (another cfg), bounded in time.
RUSTFLAGS="--cfg redis_cached_loom" CARGO_TARGET_DIR=target/loom \
    timeout 900 cargo test -p redis-cached-runtime --lib --locked -- model:: --nocapture
# The optional binary codec.
cargo test -p redis-cached-runtime --features postcard --locked codec
# The optional `metrics` export: every counter exact, the Prometheus text.
cargo clippy -p redis-cached --features metrics --test metrics --locked -- -D warnings
cargo test -p redis-cached --features metrics --locked --test metrics
# The Postgres listener's metrics: its lag, state and counters as scraped.
cargo clippy -p redis-cached-pg --all-features --all-targets --locked -- -D warnings
cargo test -p redis-cached-pg --features metrics --locked --test metrics
# Write-behind faults made on purpose: a writer killed at random points,
# a cache update that fails, a takeover whose lease lapsed (failpoints).
cargo clippy -p redis-cached --features failpoints --test write_behind_faults --locked -- -D warnings
cargo test -p redis-cached --features failpoints --locked --test write_behind_faults
# The quickstart, on the in-memory default.
env -u REDIS_URL cargo run --locked --example quickstart
# The demo service on SQLite: its load generator's counts against /metrics.
cargo clippy -p demo --all-targets --locked -- -D warnings
cargo test -p demo --locked
# The libraries on the declared minimum Rust (rust-version), when that
# toolchain is installed: `rustup toolchain install 1.88 --profile minimal`.
if rustup run 1.88 rustc --version >/dev/null 2>&1; then
    cargo +1.88 check -p redis-cached -p redis-cached-pg --all-features --locked
else
    echo "Rust 1.88 not installed: the minimum-version check is skipped"
fi
# The documentation as docs.rs builds it (every feature), each warning an
# error: a broken link, an unclosed tag. The demo is never published.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --exclude demo --all-features --no-deps --locked
# Each published crate built from its packaged files alone, so a file left
# out of a package fails here, not on crates.io.
# cargo unpacks the packaged crates into a registry source directory keyed
# by name and version, and reuses a copy an earlier run of the same version
# left there: it would verify the facade against an older runtime.
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/redis-cached-*
cargo package --workspace --exclude demo --exclude renamed-dep-test --locked
