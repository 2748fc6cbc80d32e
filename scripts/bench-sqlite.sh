#!/usr/bin/env bash
# New webhook events (a distinct event id per request) at 1 and 16 senders, side by side in one run:
# the server on SQLite (the default file, synchronous=FULL), the server on PostgreSQL, and a raw
# SQLite loop committing one small row per transaction with the same synchronous setting on the
# same disk (the physical anchor). Release builds; wrk from scripts/load.sh.
#   scripts/bench-sqlite.sh            (PostgreSQL from $PG_ADMIN_URL, default postgres://postgres@127.0.0.1:5432)
# Environment: DURATION (10s), PORT (3099), WORK (a temp dir on the disk to measure).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
admin="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432}"
export DURATION="${DURATION:-10s}"
port="${PORT:-3099}"
work="${WORK:-$(mktemp -d)}"
db="mrb_bench_sqlite_$$"
export STRIPE_WEBHOOK_SECRET=whsec_bench_sqlite
server=""
cleanup() {
    [[ -n "$server" ]] && kill "$server" 2>/dev/null || true
    psql -q "$admin/postgres" -c "drop database if exists $db" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -q --bin mindroom-billing
cargo build --release -q -p mindroom-billing-sqlite --example raw_commits
bin="$root/target/release/mindroom-billing"

serve() { # serve <label> [DATABASE_URL]
    local dir="$work/$1"
    mkdir -p "$dir"
    (cd "$dir" && exec env PORT="$port" RUST_LOG=warn ${2:+DATABASE_URL="$2"} "$bin" serve --host 127.0.0.1 >"$dir/log" 2>&1) &
    server=$!
    for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return; sleep 0.1; done
    cat "$dir/log"; exit 1
}
stop() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=""; }
load() { # load <label> <senders>
    echo "== $1, $2 sender(s)"
    URL="http://127.0.0.1:$port/webhooks/stripe" THREADS=1 CONNECTIONS="$2" SERVER_PID="$server" \
        LOAD_DIR="$work/load" scripts/load.sh distinct 2>&1 | grep -E 'Requests/sec|Latency  |  50%|  99%|RSS'
}

"$root/target/release/examples/raw_commits" "$work/raw.db" 10 FULL

serve sqlite
for senders in 1 16; do load "SQLite (default file, synchronous=FULL)" "$senders"; done
stop

psql -q "$admin/postgres" -c "create database $db"
DATABASE_URL="$admin/$db" "$bin" migrate >/dev/null
serve postgres "$admin/$db"
for senders in 1 16; do load "PostgreSQL" "$senders"; done
stop
