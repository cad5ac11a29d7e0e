#!/bin/sh
# Test step: leave a background child holding stdout, then exit 0.
# With BG_SESSION=1 the child moves to its own session (out of the step's
# process group), so only the drain deadline can end the step.
if [ "$BG_SESSION" = 1 ]; then
	/usr/bin/setsid /bin/sleep 300 &
	# wait until the child has left our session (field 6 of stat)
	while [ "$(cut -d' ' -f6 /proc/$!/stat)" != "$!" ]; do sleep 0.01; done
else
	/bin/sleep 300 &
fi
echo $! >> "$PID_FILE"
echo "left a background child"
exit 0
