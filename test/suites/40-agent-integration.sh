#!/usr/bin/env bash
# Agent integration tests: a real restart-agent on loopback over HTTP(S),
# real step programs (agent/test/steps).  Runs as root (the agent may run as
# any user; root keeps the fixtures simple).  Prints "ok - agent: ...".
set -uo pipefail
cd "${RW_BUILD_DIR:-$(pwd)}"
bin=${RA_AGENT_BIN:-agent/restart-agent}
if [ ! -x "$bin" ]; then
	echo "not ok - agent: $bin is built (run make first)"
	exit 1
fi
perl agent/test/integration.pl "$bin" 2>&1 | sed -E 's/^(not )?ok - /\1ok - agent: /'
exit "${PIPESTATUS[0]}"
