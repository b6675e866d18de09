#!/usr/bin/env bash
# The whole e2e run on this kind of machine (root, Debian bookworm, 2 cores):
#   1. cluster/build.sh    Debian packages + Kubernetes binaries built from Debian's source (cached)
#   2. cluster/images.sh   base image (debootstrap), runtime (CPU) and operator images, pause (cached layers)
#   3. cluster/cluster.sh up   a single-node cluster on 127.0.0.1 and the bridge fsbr0, images imported
#   4. FLEETSERVE_E2E=1 pytest -m e2e tests/e2e   against it
#   5. cluster/cluster.sh down (always)
# Exits with pytest's status (or the failing stage's). Extra arguments go to pytest.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
source "$HERE/cluster/lib.sh"
set +e

T0=$(date +%s)
declare -a TIMES=()
stage() {  # name, command...
    local s; s=$(date +%s)
    log "== $1"
    "${@:2}"
    local rc=$?
    TIMES+=("$1: $(( $(date +%s) - s )) s (rc $rc)")
    return $rc
}
summary() {
    log "== stage times"; local t; for t in "${TIMES[@]}"; do log "   $t"; done
    log "== total $(( $(date +%s) - T0 )) s"
}

stage build bash "$HERE/cluster/build.sh" || { summary; exit 1; }
stage images bash "$HERE/cluster/images.sh" || { summary; exit 1; }
trap 'stage down bash "$HERE/cluster/cluster.sh" down; summary' EXIT
stage up bash "$HERE/cluster/cluster.sh" up || exit 1

export KUBECONFIG=$FS_KUBECONFIG HELM=$HELM_BIN FLEETSERVE_E2E=1
cd "$REPO"
stage tests python3 -m pytest -m e2e tests/e2e -v -s -p no:cacheprovider "$@"
rc=$?
if [ $rc -ne 0 ]; then
    log "tests failed: operator log tail"
    kubectl logs -n fleetserve-e2e-system deploy/fleetserve-e2e --tail=80 2>/dev/null || true
fi
exit $rc
