#!/usr/bin/env bash
# The agent built with AddressSanitizer + UndefinedBehaviorSanitizer must
# pass the integration tests, with no sanitizer report in its logs (the
# integration script checks the logs; leaks are reported at clean exit).
set -uo pipefail
cd "${RW_BUILD_DIR:-$(pwd)}"
. "$(dirname "$0")/../agent-suite.sh"
build_agent asan "agent asan: build restart-agent-asan"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:exitcode=23}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
perl agent/test/integration.pl agent/restart-agent-asan 2>&1 | sed -E 's/^(not )?ok - /\1ok - agent asan: /'
exit "${PIPESTATUS[0]}"
