#!/usr/bin/env bash
# Install what tests/slurm needs for its real SLURM clusters, one node and two (Debian/Ubuntu, as root).
#
#   slurmctld slurmd slurm-client munge   the cluster itself
#   iproute2 util-linux                   the two-node cluster's hosts: network namespaces on a bridge
#                                         (ip), each with its own hostname and pids (unshare, nsenter)
#   slurmdbd mariadb-server               accounting: lets `sacct` answer, so submitit can see that a
#                                         cancelled job is CANCELLED (its result() raises instead of
#                                         waiting forever)
#
# Idempotent: installs only what is missing. Never fails a CI job on a machine where it cannot
# install (not root, no apt-get): it says why and exits 0, and the slurm tests then skip with a
# message naming this script.
set -euo pipefail

need=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge \
            slurmdbd:slurmdbd mariadbd:mariadb-server ip:iproute2 unshare:util-linux nsenter:util-linux; do
    bin=${pair%%:*}; pkg=${pair##*:}
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        need+=("$pkg")
    fi
done

if [ ${#need[@]} -eq 0 ]; then
    echo "install_slurm: SLURM, munge, slurmdbd/mariadb and iproute2 already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm: not root; cannot install ${need[*]} (the slurm tests will be skipped)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: apt-get not available; install ${need[*]} by hand (the slurm tests will be skipped)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# Do not let package scripts start daemons: tests/slurm/cluster.py starts its own, under a temp dir.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

install() { apt-get install -y --no-install-recommends "$@"; }
if ! install "${need[@]}"; then
    apt-get update
    install "${need[@]}"
fi
echo "install_slurm: installed ${need[*]}"
