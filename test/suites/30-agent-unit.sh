#!/usr/bin/env bash
# Agent unit tests (cmocka): signatures, config validation, request parsing, the journal,
# the job table when memory runs out.
# Builds and runs them as the unprivileged user; prints "ok - agent unit: ...".
set -uo pipefail
cd "${RW_BUILD_DIR:-$(pwd)}"
. "$(dirname "$0")/../agent-suite.sh"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
build_agent unit "agent unit: build the cmocka tests"
status=0
for t in agent/test/unit/test_verify agent/test/unit/test_config agent/test/unit/test_request agent/test/unit/test_journal agent/test/unit/test_nomem; do
	group=$(basename "$t" | sed 's/^test_//')
	as_user env CMOCKA_MESSAGE_OUTPUT=TAP "./$t" >"$log" 2>&1
	rc=$?
	sed -nE "s/^(not )?ok [0-9]+ - (.*)$/\1ok - agent unit $group: \2/p" "$log"
	if [ "$rc" -ne 0 ]; then
		status=1
		grep -vE '^(not )?ok [0-9]+ ' "$log" | sed 's/^/# /'
		grep -qE '^not ok [0-9]+ ' "$log" || echo "not ok - agent unit $group: crashed (exit $rc)"
	fi
done
exit "$status"
