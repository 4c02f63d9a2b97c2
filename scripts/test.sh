#!/usr/bin/env bash
# scripts/test.sh: the whole test suite (README's test command; .ci/run calls it).
#   1. Every crate's tests, the storage and integration suites on SQLite.
#   2. The storage and integration suites again on PostgreSQL (PARLEY_TEST_BACKEND=postgres):
#      the server scripts/postgres.sh finds or starts; each test gets a fresh database.
# The three runs share one build: each names the whole workspace (as the first does), so
# the features are unified the same way and nothing is compiled again.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== tests on SQLite: cargo test --workspace"
cargo test --workspace --locked

PARLEY_TEST_POSTGRES="${PARLEY_TEST_POSTGRES:-$(bash scripts/postgres.sh)}"
export PARLEY_TEST_POSTGRES PARLEY_TEST_BACKEND=postgres
echo "== storage tests on PostgreSQL"
cargo test --workspace --locked --lib storage::
echo "== integration tests on PostgreSQL"
cargo test --workspace --locked --test it
