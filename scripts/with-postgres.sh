#!/usr/bin/env bash
# Ensures a PostgreSQL server is reachable, exports DATABASE_URL (a superuser URL) and runs the
# given command, e.g.:
#
#   scripts/with-postgres.sh cargo test --workspace --all-features
#
# Order: an existing DATABASE_URL is used as is; else a server answering on 127.0.0.1:5432 is used
# as postgres://postgres@127.0.0.1:5432/postgres; else a throwaway cluster (trust auth, user
# postgres) is created in a temporary directory, started on a free port of 127.0.0.1, and stopped
# and removed when the command ends. MRB_FORCE_THROWAWAY_PG=1 skips the first two checks.
# If no initdb/pg_ctl is found and we are root on a Debian-like system, the postgresql package is
# installed with apt-get.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi

log() { echo "with-postgres: $*" >&2; }

force="${MRB_FORCE_THROWAWAY_PG:-0}"

if [[ "$force" != 1 && -n "${DATABASE_URL:-}" ]]; then
    exec "$@"
fi

if [[ "$force" != 1 ]] && command -v pg_isready >/dev/null 2>&1 \
    && pg_isready -q -h 127.0.0.1 -p 5432; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
    exec "$@"
fi

find_pg_bin() {
    local d
    if command -v pg_config >/dev/null 2>&1; then
        d="$(pg_config --bindir 2>/dev/null || true)"
        if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            echo "$d"
            return 0
        fi
    fi
    # Highest installed Debian/Ubuntu version first.
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
            echo "$d"
            return 0
        fi
    done
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return 0
    fi
    return 1
}

if ! pg_bin="$(find_pg_bin)"; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "no PostgreSQL found; installing the postgresql package"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    fi
    pg_bin="$(find_pg_bin)" || {
        log "cannot find initdb/pg_ctl; install PostgreSQL or set DATABASE_URL"
        exit 1
    }
fi

free_port() {
    local p
    for p in $(shuf -i 20000-60000 -n 50); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

tmp="$(mktemp -d "${TMPDIR:-/tmp}/mrb-pg.XXXXXX")"
run_as=()
if [[ "$(id -u)" -eq 0 ]]; then
    # initdb refuses to run as root: use the postgres user (or nobody).
    pg_user=postgres
    id -u "$pg_user" >/dev/null 2>&1 || pg_user=nobody
    chown "$pg_user" "$tmp"
    run_as=(runuser -u "$pg_user" --)
fi

started=0
cleanup() {
    local status=$?
    if [[ "$started" -eq 1 ]]; then
        "${run_as[@]}" "$pg_bin/pg_ctl" -D "$tmp/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"${run_as[@]}" "$pg_bin/initdb" -D "$tmp/data" -A trust -U postgres -E UTF8 --locale=C \
    --no-sync >"$tmp/initdb.log" 2>&1 || {
    cat "$tmp/initdb.log" >&2
    exit 1
}

port=""
for _ in 1 2 3; do
    port="$(free_port)" || { log "no free port"; exit 1; }
    if "${run_as[@]}" "$pg_bin/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='$tmp' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null; then
        started=1
        break
    fi
    tail -n 20 "$tmp/server.log" >&2 || true
done
if [[ "$started" -ne 1 ]]; then
    log "could not start a throwaway PostgreSQL"
    exit 1
fi

export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
log "throwaway PostgreSQL ($pg_bin) at $DATABASE_URL"
"$@"
