#!/bin/sh
# Test step: leave a child that moved to a process group of its own (but
# stayed in the step's session), record its pid, then exit 0 -- or, with
# the argument "hang", never finish.
/usr/bin/perl -e 'setpgrp(0, 0); exec "/bin/sleep", "302"' &
# wait until the child is in its own process group (field 5 of stat)
while [ "$(cut -d' ' -f5 /proc/$!/stat)" != "$!" ]; do sleep 0.01; done
echo $! >> "$PID_FILE"
echo "left a child in another process group"
if [ "$1" = hang ]; then
	trap '' TERM
	while :; do sleep 1; done
fi
exit 0
