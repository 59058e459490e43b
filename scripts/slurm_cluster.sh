#!/usr/bin/env bash
# A two-node SLURM cluster on this machine, for tests: the hosts of scripts/test_hosts.sh
# (node0 198.18.0.1, node1 198.18.0.2), a private munged (its own key and socket in DIR),
# slurmctld on node0 and one slurmd per node, all state and logs in DIR. Needs root and the
# packages of scripts/setup_slurm.sh. Client commands run on a node with SLURM_CONF=DIR/slurm.conf:
#
#   bash scripts/slurm_cluster.sh up ID DIR      # start; returns once both nodes are idle
#   SLURM_CONF=DIR/slurm.conf bash scripts/test_hosts.sh run ID 0 sbatch ...
#   bash scripts/slurm_cluster.sh down ID DIR    # kill daemons and jobs, delete the hosts
set -euo pipefail
cmd=${1:?usage: slurm_cluster.sh up|down ID DIR}
id=${2:?usage: slurm_cluster.sh $cmd ID DIR}
dir=$(realpath -m "${3:?usage: slurm_cluster.sh $cmd ID DIR}")
here=$(dirname "$(realpath "$0")")
hosts=("$here/test_hosts.sh")

down() {
  bash "${hosts[@]}" down "$id"  # every daemon and job process on the nodes
  if [ -f "$dir/munged.pid" ]; then
    kill "$(cat "$dir/munged.pid")" 2>/dev/null || true
    rm -f "$dir/munged.pid"
  fi
}

if [ "$cmd" = down ]; then
  down
  exit 0
fi
if [ "$cmd" != up ]; then
  echo "slurm_cluster.sh: unknown command $cmd (up or down)" >&2
  exit 2
fi
for tool in slurmctld slurmd sbatch munged mungekey ip unshare; do
  if ! command -v "$tool" >/dev/null; then
    echo "slurm_cluster.sh: $tool is missing: run scripts/setup_slurm.sh" >&2
    exit 2
  fi
done
down
mkdir -p "$dir/ctld" "$dir/spool-node0" "$dir/spool-node1"
rm -f "$dir/munge.key"
mungekey --create --keyfile="$dir/munge.key"
chmod 600 "$dir/munge.key"
munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" \
  --log-file="$dir/munged.log" --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed"

# cgroup v1 or v2 as the machine mounts it (slurmd loads a cgroup plugin even when no other
# plugin uses cgroups, and its autodetection fails where /sys/fs/cgroup is a tmpfs of v1 mounts)
if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then cgroup=cgroup/v2; else cgroup=cgroup/v1; fi
cat > "$dir/cgroup.conf" <<EOF
CgroupPlugin=$cgroup
EOF
cpus=$(nproc)
cat > "$dir/slurm.conf" <<EOF
ClusterName=flextron-test
SlurmctldHost=node0(198.18.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=30
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
NodeName=node0 NodeAddr=198.18.0.1 CPUs=$cpus State=UNKNOWN
NodeName=node1 NodeAddr=198.18.0.2 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=node0,node1 Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf
bash "${hosts[@]}" up "$id"
bash "${hosts[@]}" run "$id" 0 slurmctld -f "$SLURM_CONF"
bash "${hosts[@]}" run "$id" 0 slurmd -f "$SLURM_CONF"
bash "${hosts[@]}" run "$id" 1 slurmd -f "$SLURM_CONF"
for _ in $(seq 120); do
  state=$(bash "${hosts[@]}" run "$id" 0 sinfo -h -o '%D %t' 2>/dev/null || true)
  if [ "$state" = "2 idle" ]; then
    exit 0
  fi
  sleep 0.5
done
echo "slurm_cluster.sh: the nodes are not idle after 60 s (sinfo: ${state:-no answer}); logs in $dir" >&2
exit 1
