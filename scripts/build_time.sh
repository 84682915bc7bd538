#!/usr/bin/env bash
# What the attribute costs a user's build. Generates a crate with 100 cached
# methods (a third plain, a third `lock = true`, a third `stale`) and the
# same crate without the attribute, builds their dependencies once, then
# times a rebuild of each crate alone, in release and in debug, and prints
# both times and their ratio.
#
#   scripts/build_time.sh [path to a redis-cached checkout]   (default: this one)
#
# Runs on an otherwise idle machine for figures worth comparing; every
# build is repeated ROUNDS times (default 2) and the fastest kept.
set -euo pipefail
shopt -s inherit_errexit
here=$(cd "$(dirname "$0")/.." && pwd)
checkout=$(cd "${1:-$here}" && pwd)
rounds=${ROUNDS:-2}
work=$(mktemp -d)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
echo "work: $work" >&2
export CARGO_TARGET_DIR="$work/target"

methods() { # $1: with | without
    local attr
    for i in $(seq 0 99); do
        case $((i % 3)) in
            0) attr="#[redis_cached(key = \"plain$i:<id>\", cache = self.cache)]"
               recv="&self" ;;
            1) attr="#[redis_cached(key = \"lock$i:<id>\", lock = true, cache = self.cache)]"
               recv="&self" ;;
            2) attr="#[redis_cached(key = \"stale$i:<id>\", ttl = \"1m\", stale = \"5m\", cache = self.cache)]"
               recv="self: Arc<Self>" ;;
        esac
        [ "$1" = with ] || attr=""
        cat <<RS
    $attr
    pub async fn m$i($recv, id: u64) -> Result<Option<Row>, DbError> {
        tokio::task::yield_now().await;
        Ok(Some(Row { id, name: format!("{}-$i", self.prefix) }))
    }
RS
    done
}

make_crate() { # $1: with | without
    local dir="$work/$1"
    mkdir -p "$dir/src"
    cat > "$dir/Cargo.toml" <<TOML
[package]
name = "bench-$1"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
redis-cached = { path = "$checkout" }
serde = { version = "1", features = ["derive"] }
tokio = { version = "1", features = ["rt", "time"] }

[workspace]
TOML
    {
        echo '#![allow(unused_imports, dead_code)]'
        echo 'use std::sync::Arc;'
        echo 'use redis_cached::{redis_cached, Cache};'
        echo '#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]'
        echo 'pub struct Row { pub id: u64, pub name: String }'
        echo '#[derive(Debug)] pub struct DbError;'
        echo 'pub struct Repo { pub cache: Cache, pub prefix: String }'
        echo 'impl Repo {'
        methods "$1"
        echo '}'
        # Calls every method from a spawned task, as a service does: an
        # async fn nobody polls is not compiled in full.
        echo 'pub fn serve(repo: Arc<Repo>) {'
        for i in $(seq 0 99); do
            echo "    { let r = repo.clone(); tokio::spawn(async move { let _ = r.m$i(1).await; }); }"
        done
        echo '}'
    } > "$dir/src/lib.rs"
}

timed_build() { # $1: crate dir, $2: profile flag ("" or --release); prints seconds
    local best=""
    for _ in $(seq "$rounds"); do
        touch "$1/src/lib.rs"
        local start end
        start=$(date +%s.%N)
        (cd "$1" && cargo build --quiet --offline $2)
        end=$(date +%s.%N)
        local took
        took=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
        if [ -z "$best" ] || awk -v t="$took" -v b="$best" 'BEGIN { exit !(t < b) }'; then
            best=$took
        fi
    done
    echo "$best"
}

for variant in with without; do
    make_crate "$variant"
done
# Dependencies first (not timed).
for variant in with without; do
    (cd "$work/$variant" && cargo build --quiet && cargo build --quiet --release)
done
echo "checkout: $checkout ($(git -C "$checkout" rev-parse --short HEAD 2>/dev/null || echo '?'))"
for profile in --release ""; do
    name=${profile:---debug}
    with=$(timed_build "$work/with" "$profile")
    without=$(timed_build "$work/without" "$profile")
    awk -v p="${name#--}" -v w="$with" -v o="$without" \
        'BEGIN { printf "%-8s 100 cached methods: %6.1f s   without the attribute: %5.1f s   ratio %.1fx\n", p, w, o, w / o }'
done
