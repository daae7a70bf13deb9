#!/usr/bin/env bash
# The suites of t/citus against a Citus cluster on this machine (make
# test-citus): builds and installs Citus 13.2.2 for PostgreSQL 15 when it
# is missing (scripts/build-citus.sh, 2-5 minutes on 2 cores), then runs
# the suites with scripts/test.sh; each suite starts its own coordinator
# and two workers (t/lib/AQ/Citus.pm, scripts/citus.sh).
#
#   scripts/test-citus.sh                  every suite of t/citus
#   scripts/test-citus.sh t/citus/030-drain.t
#   scripts/test-citus.sh -v ...           options go to prove
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

"$top/scripts/build-citus.sh"

args=() suites=()
for a in "$@"; do
    case "$a" in
    -*) args+=("$a") ;;
    *)  suites+=("$a") ;;
    esac
done
[ ${#suites[@]} -gt 0 ] || suites=(t/citus/*.t)

exec "$top/scripts/test.sh" "${args[@]}" "${suites[@]}"
