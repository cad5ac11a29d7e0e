#!/bin/sh
# Test step: record its pid, then wait (at most 60 s) until $GATE_FILE exists.
echo $$ >> "$PID_FILE"
echo "waiting for the gate"
i=0
while [ ! -e "$GATE_FILE" ] && [ $i -lt 1200 ]; do
	sleep 0.05
	i=$((i + 1))
done
echo "gate open"
