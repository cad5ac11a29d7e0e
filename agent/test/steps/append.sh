#!/bin/sh
# Test step: record one run of the job in $COUNT_FILE.
echo "run $RESTART_AGENT_REQUEST_ID" >> "$COUNT_FILE"
echo "appended for $RESTART_AGENT_SERVICE"
