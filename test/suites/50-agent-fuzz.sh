#!/usr/bin/env bash
# Agent fuzzing: build the libFuzzer targets (clang, ASan+UBSan) and run
# each for a short while on a copy of the committed corpus
# (agent/fuzz/corpus/*).  RA_FUZZ_SECONDS sets the time per target; RA_FUZZ_KEEP=1
# keeps what a long campaign found.
set -uo pipefail
cd "${RW_BUILD_DIR:-$(pwd)}"
secs=${RA_FUZZ_SECONDS:-25}
. "$(dirname "$0")/../agent-suite.sh"
work=$(mktemp -d /tmp/ra-fuzz.XXXXXX)
chmod 777 "$work"
# RA_FUZZ_KEEP=1 keeps the new corpus entries and any crash files (a campaign's results).
if [ -n "${RA_FUZZ_KEEP:-}" ]; then
	trap 'echo "# fuzzing results kept in $work"' EXIT
else
	trap 'rm -rf "$work"' EXIT
fi
build_agent fuzz "agent fuzz: build the libFuzzer targets"
status=0
for target in verify request; do
	mkdir -p "$work/$target"
	chmod 777 "$work/$target"
	(cd "$work" && as_user "$RW_BUILD_DIR/agent/fuzz/fuzz_$target" -max_total_time="$secs" -timeout=10 \
		-rss_limit_mb=2048 -print_final_stats=1 "$work/$target" "$RW_BUILD_DIR/agent/fuzz/corpus/$target") \
		>"$work/$target.log" 2>&1
	rc=$?
	runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$work/$target.log")
	if [ "$rc" -eq 0 ]; then
		echo "ok - agent fuzz: fuzz_$target ran ${secs}s (${runs:-?} inputs) without a crash"
	else
		status=1
		tail -40 "$work/$target.log" | sed 's/^/# /'
		echo "not ok - agent fuzz: fuzz_$target found a problem (exit $rc)"
	fi
done
exit "$status"
