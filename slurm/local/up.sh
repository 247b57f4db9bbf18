#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (for tests and for trying the launchers):
# installs Debian's slurm-wlm daemons and munge when missing, writes /etc/slurm/slurm.conf for
# localhost with the CPUs and ~80% of the memory this machine has (partition "debug", default),
# and starts munged, slurmctld and slurmd. Needs root. Safe to re-run (restarts the daemons).
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/tmp/sslpipe-slurm}
if [ "$(id -u)" -ne 0 ]; then
    echo "slurm-up: needs root (apt-get and the daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    echo "slurm-up: installing slurmctld slurmd slurm-client munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
fi

"$(dirname "$0")/down.sh" >/dev/null 2>&1 || true

mkdir -p "$STATE"/{spool,state,log} /run/munge /etc/slurm
chown munge:munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
runuser -u munge -- /usr/sbin/munged

CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 * 0.8 / 1024}' /proc/meminfo)
cat > /etc/slurm/slurm.conf <<CONF
# Written by slurm/local/up.sh: a one-node cluster on localhost.
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld
slurmd -N localhost
for _ in $(seq 1 30); do
    if sinfo -h -o "%T" 2>/dev/null | grep -q "idle"; then
        echo "slurm-up: ready (localhost, $CPUS CPUs, ${MEM_MB} MB, partition debug)"
        exit 0
    fi
    sleep 1
done
echo "slurm-up: the node did not become idle; see $STATE/log" >&2
sinfo >&2 || true
exit 1
