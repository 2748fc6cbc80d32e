#!/usr/bin/env bash
# Runs every test of the workspace. Uses $DATABASE_URL, else PostgreSQL on 127.0.0.1:5432, else
# starts a throwaway cluster in a temp dir (see scripts/with-postgres.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/with-postgres.sh cargo test --workspace --all-features "$@"
