#!/usr/bin/env bash
# Install what the multi-node and SLURM tests need (Debian packages): SLURM 22.05 (slurmctld,
# slurmd, client commands), munge, iproute2 (ip netns) and util-linux (unshare). Idempotent: when
# every command is already there it installs nothing and returns at once. Needs root.
#
#   bash scripts/setup_slurm.sh
set -euo pipefail
need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge ip:iproute2 \
  unshare:util-linux; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup_slurm.sh: root is needed to install ${need[*]}" >&2
  exit 2
fi
echo "setup_slurm.sh: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends "${need[@]}" >&2
