#!/bin/sh
# Test step: write $1 bytes of the control character 0x01 (each becomes
# six bytes, "\u0001", in the JSON job record), then a newline.
head -c "$1" /dev/zero | tr '\0' '\1'
echo
