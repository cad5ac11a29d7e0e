#!/usr/bin/env bash
# TAP suite: test/t/*.pl with PostgreSQL::Test::Cluster, run as the unprivileged user.
# Prints every assertion as "ok - file: name" / "not ok - file: name".
# RW_TAP="020 090" runs only the files whose names start with those prefixes.
set -uo pipefail
cd "$RW_BUILD_DIR"
pgbin=$(pg_config --bindir)
pgxs=$(cd "$(dirname "$(pg_config --pgxs)")/../.." && pwd)
status=0
for t in test/t/*.pl; do
	[ -e "$t" ] || continue
	name=$(basename "$t" .pl)
	if [ -n "${RW_TAP:-}" ]; then
		keep=
		for p in $RW_TAP; do case "$name" in "$p"*) keep=1 ;; esac; done
		[ -n "$keep" ] || continue
	fi
	rm -rf "tmp_check/$name"
	mkdir -p "tmp_check/$name"
	chown -R "$RW_RUN_AS": tmp_check
	out="tmp_check/$name.tap"
	runuser -u "$RW_RUN_AS" -- env PATH="$pgbin:$PATH" \
		PERL5LIB="$pgxs/src/test/perl:$RW_BUILD_DIR/test/perl" \
		TESTDIR="$RW_BUILD_DIR/tmp_check/$name" PG_REGRESS="$pgxs/src/test/regress/pg_regress" \
		RW_BUILD_DIR="$RW_BUILD_DIR" \
		prove -v "$t" >"$out" 2>&1
	rc=$?
	sed -nE "s/^(\[[^]]*\]\([^)]*\) )?(not )?ok [0-9]+( - )?(.*)$/\2ok - $name: \4/p" "$out"
	if [ "$rc" -ne 0 ]; then
		status=1
		grep -q '^not ok' "$out" || echo "not ok - $name: script died (see below)"
		tail -30 "$out"
		for f in "tmp_check/$name"/tmp_check/log/*; do
			[ -f "$f" ] && { echo "--- $f"; tail -40 "$f"; }
		done
	fi
done
exit "$status"
