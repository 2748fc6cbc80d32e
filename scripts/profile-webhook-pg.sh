#!/usr/bin/env bash
# Where the time of a new webhook event goes on PostgreSQL, one sender: req/s, CPU per event of the
# server process and of the database's backends (from /proc, 10 ms ticks), and the store's SQL
# functions' time per call (track_functions). Local PostgreSQL with trust auth (127.0.0.1:5432).
#
#   scripts/profile-webhook-pg.sh [BIN] [DBNAME]   (defaults: target/release/mindroom-billing, mindroom_billing_profile)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/mindroom-billing}; DB=${2:-mindroom_billing_profile}; PORT=${PORT:-3918}
export PGOPTIONS="-c client_min_messages=warning"
psql -h 127.0.0.1 -U postgres -d postgres -qc "drop database if exists $DB with (force)" -c "create database $DB" -c "alter database $DB set track_functions = 'pl'"
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
"$BIN" migrate >/dev/null 2>&1
STRIPE_WEBHOOK_SECRET=whsec_load PORT=$PORT RUST_LOG=warn "$BIN" serve >/tmp/cpu-serve.log 2>&1 &
PID=$!
for _ in $(seq 100); do curl -sf 127.0.0.1:$PORT/ready >/dev/null && break; sleep 0.1; done
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
pgcpu() { for p in $(pgrep -f "postgres: .* $DB "); do awk '{print $14+$15}' /proc/$p/stat 2>/dev/null; done | awk '{s+=$1} END {print s+0}'; }
# warm up 2 s
STRIPE_WEBHOOK_SECRET=whsec_load THREADS=1 CONNECTIONS=1 DURATION=2s IDS=10000 URL=http://127.0.0.1:$PORT/webhooks/stripe LOAD_DIR=/tmp/cpu-load-w "$ROOT/scripts/load.sh" distinct >/dev/null 2>&1
a=$(cpu $PID); pa=$(pgcpu)
out=$(STRIPE_WEBHOOK_SECRET=whsec_load THREADS=1 CONNECTIONS=1 DURATION=10s IDS=40000 URL=http://127.0.0.1:$PORT/webhooks/stripe LOAD_DIR=/tmp/cpu-load "$ROOT/scripts/load.sh" distinct 2>/dev/null)
b=$(cpu $PID); pb=$(pgcpu)
n=$(awk -F'[ =]' '/^mode=/ {print $4}' <<<"$out")
rps=$(awk -F'[ =]' '/^mode=/ {print $8}' <<<"$out")
p99=$(awk '/^latency_ms/ {split($4, a, "="); print a[2]}' <<<"$out")
echo "$BIN: $n events, $rps req/s, p99 $p99 ms; server CPU $(awk -v t=$((b-a)) -v n=$n 'BEGIN {printf "%.3f", t*10/n}') ms/event; PostgreSQL backends CPU $(awk -v t=$((pb-pa)) -v n=$n 'BEGIN {printf "%.3f", t*10/n}') ms/event"
psql -h 127.0.0.1 -U postgres -d $DB -Atc "select funcname || ' ' || calls || ' calls ' || round((total_time/calls)::numeric,3) || ' ms/call' from pg_stat_user_functions where calls > 100 order by total_time desc limit 6"
kill $PID; wait $PID 2>/dev/null || true
psql -h 127.0.0.1 -U postgres -qc "drop database if exists $DB with (force)"
