#!/bin/sh
# Test step: ignore SIGTERM, start two children in the same process group,
# write all pids to $PID_FILE and never finish on its own.
trap '' TERM
sleep 300 &
echo $! >> "$PID_FILE"
sleep 300 &
echo $! >> "$PID_FILE"
echo $$ >> "$PID_FILE"
echo "hanging"
while :; do sleep 1; done
