# Shared settings for the local single-node cluster (sourced by cluster.sh and images.sh).
# Everything listens on 127.0.0.1 or on the bridge $FS_BRIDGE this harness creates itself.
set -euo pipefail

FS_CACHE=${FS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fleetserve}
FS_STATE=${FS_STATE:-/tmp/fleetserve-e2e}        # pids, logs, certs, kubeconfig, etcd data
K8S_SRC_VERSION=1.20.5+really1.20.2-1.1           # Debian bookworm's kubernetes source package
K8S_BIN=$FS_CACHE/k8s-1.20.2-fs2/bin      # -fsN: our build fixes (build.sh)
HELM_BIN=$FS_CACHE/helm-v3.17.2/helm

FS_BRIDGE=fsbr0
FS_POD_CIDR=10.244.0.0/24        # pods: on $FS_BRIDGE only
FS_NODE_IP=10.244.0.1            # the bridge's own address: apiserver, kubelet
FS_SVC_CIDR=10.96.0.0/24         # Service cluster IPs (kube-proxy DNATs them onto the bridge)
FS_KUBECONFIG=$FS_STATE/kubeconfig
FS_NODE=fleetserve-e2e
PAUSE_IMAGE=registry.k8s.io/pause:3.6
FS_IPT_COMMENT=fleetserve-e2e

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
