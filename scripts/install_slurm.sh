#!/usr/bin/env bash
# Install the distribution's Slurm (slurmctld, slurmd, slurm-client) and munge, for
# tests/test_slurm.py: it starts its own munged, slurmctld and slurmd with its own configuration
# under a temporary directory, and stops them; the system's services and /etc/slurm are not used.
# Only as root with apt-get (about 10 s); otherwise it says why and changes nothing, and the test
# is skipped, saying why. Never fails the run: a failed install is reported the same way.
set -uo pipefail

have() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1; }

missing=()
for command in munged slurmctld slurmd sbatch scontrol scancel; do
    have "$command" || missing+=("$command")
done
[ ${#missing[@]} -eq 0 ] && exit 0

why=""
if [ "$(id -u)" != 0 ]; then
    why="not root"
elif ! have apt-get; then
    why="no apt-get"
fi
if [ -n "$why" ]; then
    echo "install_slurm.sh: ${missing[*]} missing and ${why}: tests/test_slurm.py will be skipped" >&2
    exit 0
fi

echo "install_slurm.sh: installing slurmctld slurmd slurm-client munge for tests/test_slurm.py" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { timeout 300 apt-get update -qq &&
    timeout 600 apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; } >/dev/null; then
    echo "install_slurm.sh: apt-get failed: tests/test_slurm.py will be skipped" >&2
fi
exit 0
