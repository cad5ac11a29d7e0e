#!/usr/bin/env bash
# pg_regress suite: the SQL API, roles and row level security, on a temporary instance
# with restart_worker preloaded.  Prints one "ok - " / "not ok - " line per test file.
set -uo pipefail
cd "$RW_BUILD_DIR"
runuser -u "$RW_RUN_AS" -- make installcheck >regress.log 2>&1
rc=$?
sed -nE 's/^(test )?[[:space:]]*([A-Za-z0-9_]+)[[:space:]]+\.\.\. (ok|FAILED|failed)( .*)?$/\3 \2/p' regress.log |
	while read -r result name; do
		if [ "$result" = ok ]; then echo "ok - regress $name"; else echo "not ok - regress $name"; fi
	done
if [ "$rc" -ne 0 ]; then
	tail -20 regress.log
	[ -f regression.diffs ] && head -150 regression.diffs
fi
exit "$rc"
