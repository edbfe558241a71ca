#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the SLURM test (tests/test_slurm.py).
#   bash .ci/slurm.sh up     install Debian's SLURM + munge if missing, write the config, start
#                            munged, slurmctld and slurmd, wait until the node is idle
#   bash .ci/slurm.sh down   stop the daemons
# Root (or sudo) needed. No systemd: the daemons are started by hand.
set -euo pipefail
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
ETC=/etc/slurm
STATE=/var/spool/slurmctld
up() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  fi
  $SUDO mkdir -p $ETC $STATE /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || $SUDO mungekey --create --force >/dev/null 2>&1 || \
    $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  $SUDO chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  $SUDO chmod 400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    if [ -z "$SUDO" ]; then runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
    else sudo -u munge /usr/sbin/munged </dev/null >/dev/null 2>&1; fi
  fi
  local host node
  host=$(hostname -s)
  # The node line as slurmd sees this machine (CPUs, memory), with a little memory held back.
  node=$(slurmd -C | head -1)
  local mem=${node##*RealMemory=}
  mem=${mem%% *}
  node="NodeName=$host ${node#NodeName=* }"
  node="${node/RealMemory=$mem/RealMemory=$((mem - 1024))}"
  $SUDO tee $ETC/slurm.conf >/dev/null <<CONF
ClusterName=kiln-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  # Daemons detach; their inherited output must not hold the caller's pipes open.
  pgrep -x slurmctld >/dev/null || $SUDO /usr/sbin/slurmctld </dev/null >/dev/null 2>&1
  pgrep -x slurmd >/dev/null || $SUDO /usr/sbin/slurmd </dev/null >/dev/null 2>&1
  for _ in $(seq 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      sinfo
      return 0
    fi
    sleep 1
  done
  echo "slurm did not come up; logs:" >&2
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  return 1
}
down() {
  $SUDO pkill -x slurmd || true
  $SUDO pkill -x slurmctld || true
  $SUDO pkill -x munged || true
  for _ in $(seq 20); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || pgrep -x munged >/dev/null || break; sleep 0.5; done
}
"${1:-up}"
