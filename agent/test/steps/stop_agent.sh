#!/bin/sh
# Test step: exit 0 at once, leaving a child in its own session that holds
# the step's output open and, once this step has exited (a zombie, or
# gone), sends SIGTERM to the agent (this step's parent).  So the agent is
# stopped after this step ended and before the next one starts.
agent=$PPID
step=$$
/usr/bin/setsid /bin/sh -c "
	while [ \"\$(cut -d' ' -f3 /proc/$step/stat 2>/dev/null || echo Z)\" != Z ]; do sleep 0.01; done
	kill -TERM $agent
	exec sleep 5" &
# wait until the child has left our session (field 6 of stat), so that the
# agent's clean-up after this step does not kill it
while [ "$(cut -d' ' -f6 /proc/$!/stat)" != "$!" ]; do sleep 0.01; done
echo $! >> "$PID_FILE"
echo "stopping the agent"
