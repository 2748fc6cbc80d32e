#!/usr/bin/env bash
# Runs every test of the workspace: `scripts/test.sh [--throwaway-postgres] [cargo test arguments]`.
#
# The database tests use $DATABASE_URL, else PostgreSQL on 127.0.0.1:5432, and there they create a
# fresh `mrb_test_*` database per test and the cluster-wide roles anon, authenticated, service_role
# and authenticator (and alter them). `--throwaway-postgres` (or MRB_FORCE_THROWAWAY_PG=1) leaves
# that server alone: the tests run on a throwaway cluster in a temp dir, removed afterwards (initdb
# and pg_ctl must be installed). Without any server running, the throwaway cluster is used anyway.
# See scripts/with-postgres.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    --throwaway-postgres)
        shift
        export MRB_FORCE_THROWAWAY_PG=1
        ;;
    -h | --help)
        sed -n '2,9s/^# \{0,1\}//p' "$0"
        exit 0
        ;;
esac
exec scripts/with-postgres.sh cargo test --workspace --all-features "$@"
