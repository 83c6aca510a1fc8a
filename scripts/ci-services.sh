#!/usr/bin/env bash
# Installs the system services that the service tests start themselves (tests/services/test_slurm.py:
# slurmctld, slurmd, munge; tests/services/test_tracking_server.py: PostgreSQL's initdb and pg_ctl).
# Idempotent and quiet: with everything present it only looks and returns. It installs with
# apt-get only as root on a machine that has apt-get; otherwise it says why it skipped, and
# those tests skip with their reason. A failed install as root fails loudly.
set -euo pipefail

have() {
    command -v "$1" >/dev/null 2>&1 && return 0
    local candidate
    for candidate in /usr/sbin/"$1" /usr/lib/postgresql/*/bin/"$1"; do
        [ -x "$candidate" ] && return 0
    done
    return 1
}

packages=()
have slurmctld && have slurmd && have sbatch || packages+=(slurmctld slurmd slurm-client)
have munged || packages+=(munge)
have initdb || packages+=(postgresql)

[ ${#packages[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "ci-services: not root, so not installing ${packages[*]} (their tests will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-services: no apt-get, so not installing ${packages[*]} (their tests will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# The packages' own service start is refused where no init system runs; the tests start the
# daemons with configurations of their own.
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "ci-services: installed ${packages[*]}" >&2
