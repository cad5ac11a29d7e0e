#!/usr/bin/env bash
# The agent built with AddressSanitizer + UndefinedBehaviorSanitizer must
# pass the integration tests, with no sanitizer report in its logs (the
# integration script checks the logs; leaks are reported at clean exit).
set -uo pipefail
cd "${RW_BUILD_DIR:-$(pwd)}"
as_user() {
	if [ "$(id -u)" -eq 0 ] && [ -n "${RW_RUN_AS:-}" ]; then runuser -u "$RW_RUN_AS" -- "$@"; else "$@"; fi
}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! as_user make -s -C agent asan >"$log" 2>&1; then
	cat "$log"
	echo "not ok - agent asan: build restart-agent-asan"
	exit 1
fi
echo "ok - agent asan: build restart-agent-asan"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:exitcode=23}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
perl agent/test/integration.pl agent/restart-agent-asan 2>&1 | sed -E 's/^(not )?ok - /\1ok - agent asan: /'
exit "${PIPESTATUS[0]}"
