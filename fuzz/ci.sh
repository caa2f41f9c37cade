#!/usr/bin/env bash
# Builds every fuzz target of the wire protocol and runs each for a bounded time.
#
#   FUZZ_SECONDS   seconds per target (default 15)
#   FUZZ_TARGETS   space-separated targets to run (default: all of them, below)
#
# Exits non-zero if a target fails to build or crashes; the crashing input is left in
# fuzz/artifacts/<target>/ and its reproduction command is printed by libFuzzer.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

SECONDS_PER_TARGET="${FUZZ_SECONDS:-15}"
TARGETS="${FUZZ_TARGETS:-frame_decode frame_encode wire_check handshake_server transport_open e2ee_decode record_decode client_parsers sender_key_decode media_decode presence_decode group_decode call_decode}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
cargo fuzz --version

# -s none: no sanitizer, so this builds on the stable toolchain. Debug assertions and overflow
# checks are on (cargo-fuzz's default).
cargo fuzz build -s none

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

passed=0
failed=0
for t in $TARGETS; do
    # New inputs go to the scratch corpus (first directory); the checked-in seeds are read only.
    mkdir -p "$scratch/$t" "corpus/$t"
    log="$scratch/$t.log"
    echo "fuzz: running $t for ${SECONDS_PER_TARGET}s"
    if cargo fuzz run -s none "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 >"$log" 2>&1; then
        execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
        echo "fuzz: $t ok, ${execs:-?} executions, no crash"
        passed=$((passed + 1))
    else
        echo "fuzz: $t FAILED"
        tail -n 40 "$log"
        failed=$((failed + 1))
    fi
done

echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
