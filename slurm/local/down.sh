#!/usr/bin/env bash
# Stop the single-node cluster started by up.sh (jobs still running are killed).
set -u
DAEMONS="slurmd slurmctld munged"
running() {
    for daemon in $DAEMONS; do
        pgrep -x "$daemon" >/dev/null && return 0
    done
    return 1
}
for daemon in $DAEMONS; do
    pkill -x "$daemon" 2>/dev/null
done
for _ in $(seq 1 20); do
    running || exit 0
    sleep 0.5
done
for daemon in $DAEMONS; do
    pkill -9 -x "$daemon" 2>/dev/null
done
exit 0
