#!/usr/bin/env bash
# `store copy` at scale: fills a SQLite store with N events (default 100,000; one aggregate per 10
# events and a job each), copies it into a fresh PostgreSQL database and prints the time it took and
# the counts on both sides. Not a test: run it by hand.
#   scripts/store-copy.sh [N]        (PostgreSQL from $PG_ADMIN_URL, default postgres://postgres@127.0.0.1:5432)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100000}"
admin="${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432}"
profile="${PROFILE:-release}"
dir="$(mktemp -d)"
db="mrb_store_copy_$$"
trap 'rm -rf "$dir"; psql -q "$admin/postgres" -c "drop database if exists $db" >/dev/null 2>&1 || true' EXIT

flag=$([ "$profile" = release ] && echo --release || true)
cargo build $flag -q -p mindroom-billing-sqlite --example fill
cargo build $flag -q --bin mindroom-billing
"target/$profile/examples/fill" "$dir/data/mindroom-billing.db" "$n"
ls -l "$dir/data/mindroom-billing.db"
psql -q "$admin/postgres" -c "create database $db"
start=$(date +%s.%N)
(cd "$dir" && "$OLDPWD/target/$profile/mindroom-billing" store copy --to "$admin/$db")
end=$(date +%s.%N)
echo "store copy of $n events: $(echo "$end - $start" | bc) s ($profile build)"
