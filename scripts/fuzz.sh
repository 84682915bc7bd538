#!/usr/bin/env bash
# Fuzzes the key-template parser and the stored-entry decoder with
# libFuzzer, each for a bounded time (FUZZ_SECONDS, default 60). A crash is
# saved under fuzz/artifacts/ and fails the run: fix it, and keep its input
# as a regression case in the parser's or the codec's unit tests.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
seconds=${FUZZ_SECONDS:-60}
# cargo fuzz passes the compiler flags of a nightly toolchain (sanitizer,
# coverage); RUSTC_BOOTSTRAP lets the installed stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
for target in template decode; do
    echo "fuzzing $target for ${seconds}s"
    cargo fuzz run "$target" -- -max_total_time="$seconds" -max_len=4096
done
