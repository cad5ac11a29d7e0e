#!/bin/sh
# Test step: start a child that, told to stop (SIGTERM), takes 0.3 s to stop
# cleanly and then writes "stopped" to $MARKER; then wait for it.  The
# step's own process dies at once on SIGTERM, so its child must be given
# the grace period too.
sh -c 'trap "sleep 0.3; echo stopped > \"$MARKER\"; exit 0" TERM
	while :; do sleep 0.05; done' &
echo "started a child that stops slowly"
wait
