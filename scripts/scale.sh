#!/usr/bin/env bash
# Scale harness (issue 13): a big database next to a nearly empty one, the real plans of every
# hot-path statement, and the same loads against both, side by side.
#
#   scripts/scale.sh all        # fill + explain + load (≈ 20–30 min on a 2-core machine)
#   scripts/scale.sh fill       # (re)create both databases and fill them
#   scripts/scale.sh explain    # EXPLAIN (ANALYZE, BUFFERS) of the hot paths, via auto_explain
#   scripts/scale.sh load       # webhook, usage and entitlement loads: big vs empty database
#   scripts/scale.sh sizes      # database and table sizes
#
# Databases (dropped and created again by `fill`; on 127.0.0.1 only):
#   DATABASE_URL        postgres://postgres@127.0.0.1:5432/mindroom_billing_scale (1 M accounts and
#                       subscriptions, 10 M events, 100 k finished + 1 k due jobs)
#   EMPTY_DATABASE_URL  postgres://postgres@127.0.0.1:5432/mindroom_billing_scale_empty (only the 1,000
#                       accounts and subscriptions the usage and entitlement loads name)
# Sizes: ACCOUNTS (1000000), EVENTS (10000000), BIG_EVENTS (1000000: the newest, with 3.9 KB payloads),
# DONE_JOBS (100000), DUE_JOBS (1000). Load: DURATION (15s per run), ROUNDS (1), PORT (3961), BIN
# (target/release/mindroom-billing, built when missing). Output also goes to SCALE_OUT (target/scale).
# Needs psql, wrk, python3. Every loop is bounded; servers started here are stopped on exit.
set -euo pipefail

PHASE=${1:-all}
case "$PHASE" in fill|explain|load|sizes|all) ;; *) echo "usage: $0 [fill|explain|load|sizes|all]" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/mindroom_billing_scale}
EMPTY_DATABASE_URL=${EMPTY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/mindroom_billing_scale_empty}
ACCOUNTS=${ACCOUNTS:-1000000}
EVENTS=${EVENTS:-10000000}
BIG_EVENTS=${BIG_EVENTS:-1000000}
DONE_JOBS=${DONE_JOBS:-100000}
DUE_JOBS=${DUE_JOBS:-1000}
LOAD_ACCOUNTS=1000
DURATION=${DURATION:-15s}
ROUNDS=${ROUNDS:-1}
PORT=${PORT:-3961}
BIN=${BIN:-$ROOT/target/release/mindroom-billing}
OUT=${SCALE_OUT:-$ROOT/target/scale}
SECRET=whsec_scale_harness_0123456789
API_KEY=scale-harness-api-key-0123456789
export LOAD_DIR=${LOAD_DIR:-/tmp/mindroom-scale-load}
mkdir -p "$OUT" "$LOAD_DIR"

say() { echo "scale: $*" >&2; }
die() { say "$*"; exit 1; }
now() { date +%s.%N; }
phase_start=0
begin_phase() { phase_start=$(now); say "── $1 ──"; }
end_phase() { say "── $1 took $(python3 -c "print(f'{$(now) - $phase_start:.0f} s')") ──"; }

# Only a server on this machine: the script drops and fills databases.
for url in "$DATABASE_URL" "$EMPTY_DATABASE_URL"; do
    host=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).hostname or "")' "$url")
    [[ "$host" == 127.0.0.1 || "$host" == localhost ]] || die "refusing $host: only 127.0.0.1 / localhost"
done
db_name() { python3 -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).path.lstrip("/"))' "$1"; }
admin_url() { python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/postgres")))' "$1"; }
q() { psql "$1" -X -v ON_ERROR_STOP=1 -Atqc "$2"; }

binary() {
    if [[ ! -x "$BIN" ]]; then
        say "building $BIN"
        (cd "$ROOT" && CARGO_INCREMENTAL=0 cargo build --release --bin mindroom-billing >&2)
    fi
}

# The event template: the minified 3.9 KB invoice.paid fixture and the ids inside it.
template() {
    python3 - "$ROOT/testdata/stripe/events/2026-07-29.dahlia/invoice.paid.json" "$LOAD_DIR/template.json" <<'PY'
import json, sys
event = json.load(open(sys.argv[1]))
open(sys.argv[2], "w").write(json.dumps(event, separators=(",", ":")))
PY
}

fill_one() { # url accounts events big_events done_jobs due_jobs
    local url=$1 name
    name=$(db_name "$url")
    [[ "$name" =~ ^[a-z0-9_]+$ ]] || die "unexpected database name $name"
    say "$name: drop and create"
    q "$(admin_url "$url")" "drop database if exists $name"
    q "$(admin_url "$url")" "create database $name"
    DATABASE_URL="$url" RUST_LOG=warn "$BIN" migrate >/dev/null
    say "$name: fill (accounts $2, events $3, of which $4 with 3.9 KB payloads, done jobs $5, due jobs $6)"
    psql "$url" -X -q -v ON_ERROR_STOP=1 -v accounts="$2" -v events="$3" -v big_events="$4" \
        -v done_jobs="$5" -v due_jobs="$6" -v tpl="$(cat "$LOAD_DIR/template.json")" \
        -v tpl_event=evt_1s0jB7WZ01zgkW2wD5b4F8rX -v tpl_customer=cus_QXg1o8vcGmoR32 \
        -v tpl_subscription=sub_1Pgc6rB7WZ01zgkWNy0Cn5nw -v tpl_invoice=in_1Pgc6tB7WZ01zgkWu9fdqL6I \
        -f "$ROOT/scripts/scale/fill.sql" 2>&1 | grep --line-buffered -v '^$' >&2
}

sizes() {
    local url
    for url in "$DATABASE_URL" "$EMPTY_DATABASE_URL"; do
        echo "database $(db_name "$url"): $(q "$url" "select pg_size_pretty(pg_database_size(current_database()))")"
        psql "$url" -X -q -P footer=off -c "
            select c.relname as table, to_char(c.reltuples, 'FM999,999,999') as rows,
                   pg_size_pretty(pg_table_size(c.oid)) as table_and_toast,
                   pg_size_pretty(pg_indexes_size(c.oid)) as indexes,
                   pg_size_pretty(pg_total_relation_size(c.oid)) as total
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where n.nspname = 'public' and c.relkind = 'r'
            order by pg_total_relation_size(c.oid) desc limit 10"
    done
}

explain() {
    # Due jobs again (a previous load's server ran them), then the plans.
    q "$DATABASE_URL" "update public.billing_jobs set state = 'pending', attempts = 0, locked_until = null,
        run_after = now() - interval '1 second' where key like 'scale:due:%'" >/dev/null
    # An active starter subscription (row i ≡ 1 mod 100) in the middle of the fill, and its account.
    local i=$(( (ACCOUNTS / 200) * 100 + 1 ))
    psql "$DATABASE_URL" -X -q -v sub="sub_scale_$(printf '%08d' $i)" -v acc="$(q "$DATABASE_URL" "select md5('cus_scale_$i')::uuid")" \
        -f "$ROOT/scripts/scale/explain.sql" >"$OUT/explain.txt" 2>&1 || { cat "$OUT/explain.txt" >&2; die "explain failed"; }
    python3 - "$OUT/explain.txt" <<'PY'
# The warm pass, per call: its total time, its slowest statement, and any sequential scan.
import re, sys
# Statement plans from the warm pass (auto_explain), call times from the timing pass (EXPLAIN ANALYZE).
text = open(sys.argv[1]).read().split("#### warm pass", 1)[1]
warm, timing = text.split("#### timing pass", 1)
def sections(part):
    for section in part.split("#### ")[1:]:
        title, body = section.split("\n", 1)
        if not title.startswith("end of pass"):
            yield title.strip(), body
times = {title: [float(t) for t in re.findall(r"Execution Time: ([0-9.]+) ms", body)] for title, body in sections(timing)}
print(f"{'hot path':<72} {'call':>9} {'slowest statement':>18}  seq scans")
worst = 0.0
for title, body in sections(warm):
    durations = [float(d) for d in re.findall(r"duration: ([0-9.]+) ms\s+plan:", body)]
    # The call itself finishes (and is logged) after every statement inside it.
    nested = durations[:-1]
    seq = sorted(set(re.findall(r"Seq Scan on (\w+)", body)))
    call = max(times.get(title) or [0.0])
    worst = max(worst, call)
    print(f"{title[:72]:<72} {call:>7.3f}ms {max(nested, default=0.0):>16.3f}ms  {', '.join(seq) or '-'}")
print(f"slowest call: {worst:.3f} ms (target < 5 ms)")
PY
}

# ---- load ----------------------------------------------------------------------------------------
server_pid=
stop_server() {
    if [[ -n "$server_pid" ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}
trap stop_server EXIT

start_server() { # url
    stop_server
    DATABASE_URL="$1" STRIPE_WEBHOOK_SECRET=$SECRET BILLING_API_KEY=$API_KEY PORT=$PORT RUST_LOG=warn \
        STRIPE_PRICE_STARTER=price_1PgafmB7WZ01zgkW6dKueIc5 STRIPE_PRICE_PRO=price_1PgagYB7WZ01zgkWq2Lx9Rz4 \
        "$BIN" serve >"$OUT/serve.log" 2>&1 &
    server_pid=$!
    local i
    for i in $(seq 1 120); do
        curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$OUT/serve.log" >&2; die "serve exited"; }
        sleep 0.5
    done
    # Let the worker drain the due jobs and the unapplied pick-up first: the loads measure requests.
    for i in $(seq 1 240); do
        [[ "$(q "$1" "select count(*) from public.billing_jobs where state in ('pending', 'running') and run_after <= now()")" == 0 ]] && break
        sleep 0.5
    done
}

# One wrk run: prints "req/s p50 p99 non2xx".
wrk_summary() {
    python3 -c '
import re, sys
t = sys.stdin.read()
rps = re.search(r"Requests/sec:\s+([0-9.]+)", t)
def lat(p):
    m = re.search(r"\s" + p + r"%\s+([0-9.]+)(us|ms|s)\b", t)
    if not m: return "?"
    v = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
    return f"{v:.2f}ms"
non = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
print(rps.group(1) if rps else "?", lat("50"), lat("99"), non.group(1) if non else "0")'
}

load_one() { # label url
    local label=$1 url=$2 out
    start_server "$url"
    for c in 1 16; do
        out=$(URL="http://127.0.0.1:$PORT/webhooks/stripe" STRIPE_WEBHOOK_SECRET=$SECRET THREADS=1 CONNECTIONS=$c \
            DURATION=$DURATION IDS=60000 LOAD_DIR="$LOAD_DIR/webhook" "$ROOT/scripts/load.sh" distinct 2>&1)
        echo "$out" >>"$OUT/load-raw.txt"
        echo "$label webhook-new-event c=$c $(echo "$out" | wrk_summary)"
    done
    for mode in usage entitlements; do
        for c in 16 64; do
            out=$(API_MODE=$mode BILLING_API_KEY=$API_KEY wrk -t2 -c$c -d"$DURATION" --latency \
                -s "$ROOT/benches/load/api.lua" "http://127.0.0.1:$PORT" 2>&1)
            echo "$out" >>"$OUT/load-raw.txt"
            echo "$label $mode c=$c $(echo "$out" | wrk_summary)"
        done
    done
    stop_server
}

load() {
    command -v wrk >/dev/null || die "wrk not found (Debian: apt-get install wrk)"
    # The accounts both databases hold (row i of the fill), active ones only.
    python3 - "$LOAD_ACCOUNTS" >"$LOAD_DIR/accounts.txt" <<'PY'
import hashlib, sys, uuid
for i in range(1, int(sys.argv[1]) + 1):
    if i % 100 < 85:
        print(uuid.UUID(hashlib.md5(f"cus_scale_{i}".encode()).hexdigest()))
PY
    : >"$OUT/load-raw.txt"
    local results=() round
    for round in $(seq 1 "$ROUNDS"); do
        mapfile -t -O "${#results[@]}" results < <(load_one big "$DATABASE_URL")
        mapfile -t -O "${#results[@]}" results < <(load_one empty "$EMPTY_DATABASE_URL")
    done
    printf '%s\n' "${results[@]}" >"$OUT/load-lines.txt"
    python3 - "$OUT/load-lines.txt" <<'PY'
# Side by side: the median over rounds of each run (req/s range in brackets), big / empty database.
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, kind, conc, rps, p50, p99, non = line.split()
    rows.setdefault((kind, conc), {}).setdefault(label, []).append((float(rps), p50, p99, int(non)))
def med(runs):
    runs = sorted(runs)
    return runs[(len(runs) - 1) // 2], f"{runs[0][0]:.0f}-{runs[-1][0]:.0f}", sum(r[3] for r in runs)
print(f"{'load':<26} {'big req/s (range)':>20} {'p50':>8} {'p99':>9} {'empty req/s (range)':>21} {'p50':>8} {'p99':>9} {'big/empty':>9} non-2xx")
for (kind, conc), by in rows.items():
    (b, br, bn), (e, er, en) = med(by.get("big", [(0, "?", "?", 0)])), med(by.get("empty", [(0, "?", "?", 0)]))
    ratio = f"{b[0] / e[0] * 100:.0f} %" if e[0] else "?"
    print(f"{kind + ' ' + conc:<26} {f'{b[0]:.0f} ({br})':>20} {b[1]:>8} {b[2]:>9} {f'{e[0]:.0f} ({er})':>21} {e[1]:>8} {e[2]:>9} {ratio:>9} {bn}/{en}")
PY
}

# ---- main ----------------------------------------------------------------------------------------
say "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
if [[ "$PHASE" == fill || "$PHASE" == all ]]; then
    begin_phase fill
    df -h "$(psql "$(admin_url "$DATABASE_URL")" -XAtqc 'show data_directory')" >&2 || true
    binary
    template
    fill_one "$EMPTY_DATABASE_URL" "$LOAD_ACCOUNTS" 0 0 0 0
    fill_one "$DATABASE_URL" "$ACCOUNTS" "$EVENTS" "$BIG_EVENTS" "$DONE_JOBS" "$DUE_JOBS"
    end_phase fill
fi
if [[ "$PHASE" == fill || "$PHASE" == sizes || "$PHASE" == all ]]; then
    sizes | tee "$OUT/sizes.txt"
fi
if [[ "$PHASE" == explain || "$PHASE" == all ]]; then
    begin_phase explain
    explain | tee "$OUT/explain-summary.txt"
    python3 "$ROOT/scripts/scale/trim_plans.py" "$OUT/explain.txt" >"$OUT/explain-trimmed.txt"
    say "plans: $OUT/explain.txt (trimmed: $OUT/explain-trimmed.txt)"
    end_phase explain
fi
if [[ "$PHASE" == load || "$PHASE" == all ]]; then
    begin_phase load
    binary
    say "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    load | tee "$OUT/load.txt"
    say "load average after: $(cut -d' ' -f1-3 /proc/loadavg); raw wrk output: $OUT/load-raw.txt"
    end_phase load
fi
