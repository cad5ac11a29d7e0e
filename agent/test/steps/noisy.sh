#!/bin/sh
# Test step: write about 200 KB of output, then an end marker.
i=0
while [ $i -lt 2000 ]; do
	echo "line $i xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
	i=$((i + 1))
done
echo "error output" >&2
echo "END-MARKER"
