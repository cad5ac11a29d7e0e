#!/bin/sh
# Test step: make the journal's next write of this job fail, by putting a
# directory where the agent writes its temporary record file.
mkdir "$JOBS_DIR/.$RESTART_AGENT_REQUEST_ID.tmp"
echo "journal blocked"
