# Shared by the agent's suites in test/suites/ (sourced, not run): run a command as the
# unprivileged user when started as root, and build a make target of agent/ or fail the
# suite with one "not ok" line.

# Run a command as $RW_RUN_AS when we are root and it is set, else as ourselves.
as_user() {
	if [ "$(id -u)" -eq 0 ] && [ -n "${RW_RUN_AS:-}" ]; then runuser -u "$RW_RUN_AS" -- "$@"; else "$@"; fi
}

# build_agent TARGET LABEL: make -C agent TARGET as the user; on failure show the log,
# print "not ok - LABEL" and exit the suite.
build_agent() {
	local build_log
	build_log=$(mktemp)
	if ! as_user make -s -C agent "$1" >"$build_log" 2>&1; then
		cat "$build_log"
		rm -f "$build_log"
		echo "not ok - $2"
		exit 1
	fi
	rm -f "$build_log"
	echo "ok - $2"
}
