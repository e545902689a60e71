#!/usr/bin/env bash
# Runs every fuzz target for 10 million executions (or RUNS), each capped at MAX_SECS, and
# prints libFuzzer's final line per target. Without a sanitizer (SANITIZER=address to add
# one): the code is safe Rust, and a panic is what the oracles report; AddressSanitizer
# costs about ten times the executions. Inputs up to MAX_LEN bytes. Needs nightly and
# cargo-fuzz:
#   cargo install cargo-fuzz && fuzz/run-all.sh
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-10000000}
MAX_SECS=${MAX_SECS:-1800}
SANITIZER=${SANITIZER:-none}
MAX_LEN=${MAX_LEN:-4096}
for t in frames manifest activate journal export token policy; do
    log=$(mktemp)
    start=$(date +%s)
    cargo +nightly fuzz run -O -s "$SANITIZER" "$t" -- -runs="$RUNS" -max_total_time="$MAX_SECS" \
        -max_len="$MAX_LEN" -print_final_stats=1 >"$log" 2>&1 \
        || { echo "$t: FAILED"; tail -30 "$log"; exit 1; }
    end=$(date +%s)
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    echo "$t: $runs executions in $((end - start)) s, $cov, corpus $(ls "corpus/$t" | wc -l) inputs"
    rm -f "$log"
done
