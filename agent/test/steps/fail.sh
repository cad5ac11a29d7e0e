#!/bin/sh
# Test step: fail with exit code 3.
echo "failing on purpose" >&2
exit 3
