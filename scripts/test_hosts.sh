#!/usr/bin/env bash
# Two test hosts on this machine: network namespaces ID-0 and ID-1 joined by a veth pair, with
# addresses 198.18.0.1 and 198.18.0.2 (RFC 2544's range for network tests; the traffic never
# leaves the machine), their own hostnames node0 and node1 and an /etc/hosts naming both, as on
# a two-node cluster. Needs root and iproute2 (ip netns) and util-linux (unshare).
#
#   bash scripts/test_hosts.sh up ID            # create (replaces a leftover ID)
#   bash scripts/test_hosts.sh run ID I CMD...  # run CMD on host I (0 or 1) as node$I
#   bash scripts/test_hosts.sh kill ID I        # SIGKILL every process on host I (a lost node)
#   bash scripts/test_hosts.sh down ID          # kill everything on both hosts, delete them
set -euo pipefail
cmd=${1:?usage: test_hosts.sh up|run|kill|down ID ...}
id=${2:?usage: test_hosts.sh $cmd ID ...}

kill_host() {  # every process in namespace $1, until none is left
  local pids
  for _ in $(seq 50); do
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  echo "test_hosts.sh: processes left in $1: $pids" >&2
  return 1
}

down() {
  for i in 0 1; do
    if ip netns list | grep -qw "$id-$i"; then
      kill_host "$id-$i"
      ip netns del "$id-$i"
    fi
    rm -rf "/etc/netns/$id-$i"
  done
}

case "$cmd" in
  up)
    for tool in ip unshare; do
      command -v "$tool" >/dev/null || { echo "test_hosts.sh: $tool is missing (apt-get install iproute2 util-linux)" >&2; exit 2; }
    done
    down
    ip netns add "$id-0"
    ip netns add "$id-1"
    # interface names are at most 15 characters: name them inside the namespaces
    ip link add fxveth0 netns "$id-0" type veth peer name fxveth1 netns "$id-1"
    for i in 0 1; do
      ip -n "$id-$i" addr add "198.18.0.$((i + 1))/24" dev "fxveth$i"
      ip -n "$id-$i" link set "fxveth$i" up
      ip -n "$id-$i" link set lo up
      mkdir -p "/etc/netns/$id-$i"  # ip netns exec mounts these over /etc
      printf '127.0.0.1 localhost\n198.18.0.1 node0\n198.18.0.2 node1\n' > "/etc/netns/$id-$i/hosts"
    done
    ;;
  run)
    host=${3:?usage: test_hosts.sh run ID I CMD...}
    shift 3
    exec ip netns exec "$id-$host" unshare --uts sh -c 'hostname "$0" && exec "$@"' "node$host" "$@"
    ;;
  kill) kill_host "$id-${3:?usage: test_hosts.sh kill ID I}" ;;
  down) down ;;
  *) echo "test_hosts.sh: unknown command $cmd (up, run, kill or down)" >&2; exit 2 ;;
esac
