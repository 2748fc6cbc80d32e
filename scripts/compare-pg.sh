#!/usr/bin/env bash
# The PostgreSQL-backed server next to `pgbench -N` on the same server, in one run (DESIGN §7):
# new webhook events (1 sender), usage writes (1 / 4 / 16 clients) and entitlement reads (64
# connections). Prints one table; nothing is asserted (numbers, not tests).
#
#   cargo build --release --bin mindroom-billing && scripts/compare-pg.sh
#
# Environment: PGURL (postgres://postgres@127.0.0.1:5432), DURATION (10 s per run), PORT (3917).
# Creates and drops the databases mindroom_billing_compare and mindroom_billing_pgbench. Needs wrk,
# pgbench, psql and python3. Talks to 127.0.0.1 only.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/mindroom-billing}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
DURATION=${DURATION:-10}
PORT=${PORT:-3917}
DB=mindroom_billing_compare
BENCH_DB=mindroom_billing_pgbench
WORK=$(mktemp -d)
export PGOPTIONS="-c client_min_messages=warning"
export BILLING_API_KEY=compare-load-key-0123456789
SECRET=whsec_compare_load
ENTERPRISE=price_compare_enterprise
for tool in wrk pgbench psql python3; do
  command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done
[[ -x "$BIN" ]] || { echo "build first: cargo build --release --bin mindroom-billing" >&2; exit 1; }

server=""
cleanup() {
  [[ -n "$server" ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  psql "$PGURL/postgres" -qc "drop database if exists $DB with (force)" -c "drop database if exists $BENCH_DB with (force)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

psql "$PGURL/postgres" -qc "drop database if exists $DB with (force)" -c "create database $DB" \
  -c "drop database if exists $BENCH_DB with (force)" -c "create database $BENCH_DB" >/dev/null
pgbench -q -i -s 10 "$PGURL/$BENCH_DB" >/dev/null 2>&1
DATABASE_URL="$PGURL/$DB" "$BIN" migrate >/dev/null 2>&1

DATABASE_URL="$PGURL/$DB" STRIPE_WEBHOOK_SECRET=$SECRET STRIPE_PRICE_ENTERPRISE=$ENTERPRISE PORT=$PORT \
  RUST_LOG=warn "$BIN" serve >"$WORK/serve.log" 2>&1 &
server=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break; sleep 0.1; done

# 64 enterprise subscriptions (unlimited usage), each through a signed webhook.
python3 - "$PORT" "$SECRET" "$ENTERPRISE" <<'PY'
import hashlib, hmac, json, sys, time, urllib.request
port, secret, price = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
now = int(time.time())
for i in range(64):
    sub = {"id": f"sub_compare{i:03d}", "object": "subscription", "customer": f"cus_compare{i:03d}",
           "status": "active", "cancel_at_period_end": False, "canceled_at": None, "trial_end": None, "metadata": {},
           "items": {"object": "list", "data": [{"id": f"si_compare{i:03d}", "object": "subscription_item",
                     "current_period_start": now, "current_period_end": now + 30 * 86400,
                     "price": {"id": price, "object": "price"}}]}}
    event = {"id": f"evt_compare_sub{i:03d}", "object": "event", "api_version": "2026-07-29.dahlia",
             "created": now - 60, "livemode": False, "type": "customer.subscription.created", "data": {"object": sub}}
    body = json.dumps(event).encode()
    sig = hmac.new(secret, str(now).encode() + b"." + body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/stripe", body,
                                 {"Stripe-Signature": f"t={now},v1={sig}", "Content-Type": "application/json"})
    assert urllib.request.urlopen(req).status == 200
PY
mkdir -p "$WORK/api"
psql "$PGURL/$DB" -Atc "select id from public.accounts where stripe_customer_id like 'cus_compare%'" >"$WORK/api/accounts.txt"
[[ $(wc -l <"$WORK/api/accounts.txt") -eq 64 ]] || { echo "seeding failed" >&2; exit 1; }

pgbench_tps() { # clients
  pgbench -N -c "$1" -j $(( $1 < 2 ? 1 : 2 )) -T "$DURATION" "$PGURL/$BENCH_DB" 2>/dev/null | awk '/^tps/ {printf "%.0f", $3}'
}
api() { # mode connections → "req/s p99"
  API_MODE=$1 LOAD_DIR=$WORK/api wrk -t$(( $2 < 2 ? 1 : 2 )) -c"$2" -d"${DURATION}s" --latency \
    -s "$ROOT/benches/load/api.lua" "http://127.0.0.1:$PORT" | awk '
      /Requests\/sec:/ { rps = sprintf("%.0f", $2) }
      $1 == "99%" { v = $2; unit = v; sub(/[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v)
                    p99 = sprintf("%.2f", v * (unit == "us" ? 0.001 : (unit == "s" ? 1000 : 1))) }
      /Non-2xx/ { non = " (" $NF " non-2xx)" }
      END { printf "%s %s%s", rps, p99, non }'
}
row() { printf '| %-34s | %10s | %9s | %14s | %6s |\n' "$@"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f %%", 100 * a / b}'; }

echo "PostgreSQL-backed server vs pgbench -N, ${DURATION} s per run, $(nproc) cores"
row "run" "req/s" "p99 ms" "pgbench -N TPS" "ratio"
row "---" "---" "---" "---" "---"

tps=$(pgbench_tps 1)
ids=$(( DURATION * 3000 ))
out=$(STRIPE_WEBHOOK_SECRET=$SECRET THREADS=1 CONNECTIONS=1 DURATION=${DURATION}s IDS=$ids \
  URL=http://127.0.0.1:$PORT/webhooks/stripe LOAD_DIR=$WORK/load "$ROOT/scripts/load.sh" distinct 2>/dev/null)
rps=$(awk -F'[ =]' '/^mode=/ {print $8}' <<<"$out")
p99=$(awk '/^latency_ms/ {split($4, a, "="); print a[2]}' <<<"$out")
row "new webhook event, 1 sender" "$rps" "$p99" "$tps" "$(ratio "$rps" "$tps")"

for c in 1 4 16; do
  tps=$(pgbench_tps "$c")
  read -r rps p99 rest <<<"$(api usage "$c")"
  row "usage write, $c client(s)" "$rps" "$p99${rest:+ $rest}" "$tps" "$(ratio "$rps" "$tps")"
done

read -r rps p99 rest <<<"$(api entitlements 64)"
row "entitlement read, 64 connections" "$rps" "$p99${rest:+ $rest}" "" "target 10,000"
