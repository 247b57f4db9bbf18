#!/usr/bin/env bash
# Stop the single-node cluster started by up.sh (jobs still running are killed).
set -u
for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" 2>/dev/null
done
for _ in $(seq 1 20); do
    pgrep -x "slurmd|slurmctld|munged" >/dev/null || exit 0
    sleep 0.5
done
pkill -9 -x "slurmd|slurmctld|munged" 2>/dev/null
exit 0
