#!/bin/sh
# Test step: take $1 seconds.
sleep "$1"
echo "slept $1"
