#!/usr/bin/env bash
# The agent's systemd unit (agent/restart-agent.service), checked without running systemd
# (PID 1 here is not systemd): systemd-analyze verify finds no unknown or malformed
# setting and the programs it starts (the agent installed by test/run), and the sandbox
# keeps systemd's exposure score at 2.0 or below.  Prints "ok - agent systemd: ...".
set -uo pipefail
cd "${RW_BUILD_DIR:-$(pwd)}"
unit=agent/restart-agent.service
status=0

out=$(systemd-analyze verify "$unit" 2>&1)
rc=$?
if [ "$rc" -eq 0 ] && [ -z "$out" ]; then
	echo "ok - agent systemd: systemd-analyze verify accepts the unit without a warning"
else
	echo "not ok - agent systemd: systemd-analyze verify accepts the unit without a warning"
	printf '%s\n' "$out" | sed 's/^/# /'
	status=1
fi

out=$(systemd-analyze security --offline=yes --threshold=20 "$unit" 2>&1)
rc=$?
level=$(printf '%s\n' "$out" | sed -nE 's/.*Overall exposure level for [^:]*: ([0-9.]+).*/\1/p')
if [ "$rc" -eq 0 ] && [ -n "$level" ]; then
	echo "ok - agent systemd: exposure level $level, at most 2.0 (systemd-analyze security)"
else
	echo "not ok - agent systemd: exposure level at most 2.0 (systemd-analyze security: ${level:-no level})"
	printf '%s\n' "$out" | grep -v '^✓' | sed 's/^/# /' | tail -30
	status=1
fi
exit "$status"
