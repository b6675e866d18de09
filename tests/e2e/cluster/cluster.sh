#!/usr/bin/env bash
# A real single-node Kubernetes 1.20 from Debian packages (see build.sh), for the e2e tests.
#   tests/e2e/cluster/cluster.sh up      # etcd, apiserver, controller-manager, scheduler, containerd, kubelet, kube-proxy
#   tests/e2e/cluster/cluster.sh down    # stops them by PID, removes pods' netns, the bridge, iptables rules, state
#   tests/e2e/cluster/cluster.sh status
# Listens only on 127.0.0.1 and on the bridge fsbr0 (10.244.0.1) it creates; pods may not forward
# off the bridge (a FORWARD drop rule), Service IPs are routed onto the bridge. Images: every
# $FS_CACHE/images/*.tar (docker save format, made by images.sh) is imported into containerd.
# Kubeconfig: $FS_STATE/kubeconfig.
source "$(dirname "$0")/lib.sh"

PKI=$FS_STATE/pki
CTRD_SOCK=$FS_STATE/containerd/containerd.sock
PROCS=(containerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

start() {  # name, command...: runs in the background, pid in $FS_STATE/pids/<name>
    local name=$1; shift
    "$@" > "$FS_STATE/logs/$name.log" 2>&1 &
    echo $! > "$FS_STATE/pids/$name"
}

wait_for() {  # seconds, description, command...
    local secs=$1 what=$2; shift 2
    local end=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || die "timed out after ${secs}s waiting for $what (logs: $FS_STATE/logs)"
        sleep 1
    done
}

certs() {
    mkdir -p "$PKI"; cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=fleetserve-e2e-ca 2>/dev/null
    sign() {  # name, subject, [extensions]
        openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
        printf '%s\n' "${3:-extendedKeyUsage=clientAuth}" > "$1.ext"
        openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 2 \
            -extfile "$1.ext" 2>/dev/null
    }
    sign apiserver /CN=kube-apiserver "subjectAltName=IP:$FS_NODE_IP,IP:127.0.0.1,IP:${FS_SVC_CIDR%.0/*}.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth"
    sign kubelet-serving "/CN=$FS_NODE" "subjectAltName=IP:$FS_NODE_IP,DNS:$FS_NODE
extendedKeyUsage=serverAuth"
    sign admin "/O=system:masters/CN=fleetserve-e2e-admin"
    sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
    sign kubelet "/O=system:nodes/CN=system:node:$FS_NODE"
    openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    kubeconfig admin > "$FS_KUBECONFIG"
    kubeconfig kubelet > "$PKI/kubelet.kubeconfig"
    cd - >/dev/null
}

kubeconfig() {  # user cert name -> kubeconfig on stdout
    cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fleetserve-e2e
  cluster: {server: "https://$FS_NODE_IP:6443", certificate-authority: "$PKI/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$PKI/$1.crt", client-key: "$PKI/$1.key"}
contexts:
- name: fleetserve-e2e
  context: {cluster: fleetserve-e2e, user: $1}
current-context: fleetserve-e2e
EOF
}

network() {
    ip link add "$FS_BRIDGE" type bridge
    ip addr add "$FS_NODE_IP/${FS_POD_CIDR#*/}" dev "$FS_BRIDGE"
    ip link set "$FS_BRIDGE" up
    # Service IPs stay on the bridge (kube-proxy DNATs them to pods); nothing goes to the default route.
    ip route add "$FS_SVC_CIDR" dev "$FS_BRIDGE" src "$FS_NODE_IP"
    # Pods forward only within the bridge: never off the machine.
    iptables -I FORWARD -i "$FS_BRIDGE" ! -o "$FS_BRIDGE" -m comment --comment "$FS_IPT_COMMENT" -j DROP
    iptables -I FORWARD -o "$FS_BRIDGE" ! -i "$FS_BRIDGE" -m comment --comment "$FS_IPT_COMMENT" -j DROP
    cat /proc/sys/net/ipv4/ip_forward > "$FS_STATE/ip_forward.orig"
    echo 1 > /proc/sys/net/ipv4/ip_forward   # Service IP -> pod on the same bridge is routed
    mkdir -p "$FS_STATE/cni/net.d" "$FS_STATE/cni/ipam"
    cat > "$FS_STATE/cni/net.d/10-fleetserve.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "fleetserve-e2e", "plugins": [
  {"type": "bridge", "bridge": "$FS_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$FS_STATE/cni/ipam",
            "ranges": [[{"subnet": "$FS_POD_CIDR", "gateway": "$FS_NODE_IP"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}}]}
EOF
}

containerd_up() {
    mkdir -p "$FS_STATE/containerd"
    # restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE; no imports (they reset settings).
    containerd config default > "$FS_STATE/containerd/config.toml"
    python3 -c '
import re, sys
path, state, sock, pause = sys.argv[1:5]
c = open(path).read()
def sub(pat, rep):
    global c
    c, n = re.subn(pat, rep, c, count=1, flags=re.M | re.S)
    assert n, pat
sub(r"^root = .*?$", f"root = \"{state}/containerd/root\"")
sub(r"^state = .*?$", f"state = \"{state}/containerd/state\"")
sub(r"^imports = .*?$", "imports = []")
sub(r"(\[grpc\][^\[]*?)address = \".*?\"", lambda m: m.group(1) + f"address = \"{sock}\"")
sub(r"restrict_oom_score_adj = false", "restrict_oom_score_adj = true")
sub(r"sandbox_image = \".*?\"", f"sandbox_image = \"{pause}\"")
sub(r"bin_dir = \".*?\"", "bin_dir = \"/usr/lib/cni\"")
sub(r"conf_dir = \".*?\"", f"conf_dir = \"{state}/cni/net.d\"")
sub(r"stream_server_address = \".*?\"", "stream_server_address = \"127.0.0.1\"")
open(path, "w").write(c)
' "$FS_STATE/containerd/config.toml" "$FS_STATE" "$CTRD_SOCK" "$PAUSE_IMAGE"
    start containerd containerd --config "$FS_STATE/containerd/config.toml"
    wait_for 30 containerd ctr -a "$CTRD_SOCK" version
    local t
    for t in "$FS_CACHE"/images/*.tar; do
        [ -e "$t" ] || continue
        log "import $(basename "$t")"
        ctr -a "$CTRD_SOCK" -n k8s.io images import "$t" >/dev/null
    done
    ctr -a "$CTRD_SOCK" -n k8s.io images ls -q | grep -qx "$PAUSE_IMAGE" || die "no $PAUSE_IMAGE: run images.sh first"
}

control_plane_up() {
    mkdir -p "$FS_STATE/etcd"
    start etcd etcd --name fleetserve-e2e --data-dir "$FS_STATE/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster fleetserve-e2e=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
        --quota-backend-bytes 1073741824
    start kube-apiserver "$K8S_BIN/kube-apiserver" \
        --etcd-servers http://127.0.0.1:2379 --bind-address "$FS_NODE_IP" --advertise-address "$FS_NODE_IP" \
        --secure-port 6443 --insecure-port 0 --service-cluster-ip-range "$FS_SVC_CIDR" \
        --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
        --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$PKI/apiserver-kubelet-client.key" --kubelet-preferred-address-types InternalIP \
        --authorization-mode Node,RBAC --allow-privileged \
        --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
        --service-account-issuer https://kubernetes.default.svc --service-node-port-range 30000-30100
    wait_for 90 kube-apiserver kubectl --kubeconfig "$FS_KUBECONFIG" get --raw /readyz
    start kube-controller-manager "$K8S_BIN/kube-controller-manager" \
        --kubeconfig "$FS_KUBECONFIG" --bind-address 127.0.0.1 --port 0 --leader-elect=false \
        --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
        --use-service-account-credentials=false --node-monitor-grace-period 20s --pod-eviction-timeout 30s
    start kube-scheduler "$K8S_BIN/kube-scheduler" \
        --kubeconfig "$FS_KUBECONFIG" --bind-address 127.0.0.1 --port 0 --leader-elect=false
}

node_up() {
    mkdir -p "$FS_STATE/kubelet"
    cat > "$FS_STATE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $FS_NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
cgroupDriver: cgroupfs
failSwapOn: false
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}, x509: {clientCAFile: $PKI/ca.crt}}
authorization: {mode: AlwaysAllow}
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
serializeImagePulls: false
resolvConf: /etc/resolv.conf
EOF
    start kubelet "$K8S_BIN/kubelet" --config "$FS_STATE/kubelet/config.yaml" \
        --kubeconfig "$PKI/kubelet.kubeconfig" --root-dir "$FS_STATE/kubelet/root" \
        --container-runtime remote --container-runtime-endpoint "unix://$CTRD_SOCK" \
        --node-ip "$FS_NODE_IP" --hostname-override "$FS_NODE" --cert-dir "$PKI/kubelet-certs" --v 1
    start kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig "$FS_KUBECONFIG" --proxy-mode iptables \
        --cluster-cidr "$FS_POD_CIDR" --hostname-override "$FS_NODE" --bind-address "$FS_NODE_IP" \
        --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 \
        --nodeport-addresses "$FS_NODE_IP/32" --conntrack-max-per-core 0
    wait_for 90 "node $FS_NODE registered" kubectl --kubeconfig "$FS_KUBECONFIG" get node "$FS_NODE"
    # A fake GPU: the scheduler honours nvidia.com/gpu requests; containers run the CPU build.
    fake_gpus "${FS_FAKE_GPUS:-4}"
    wait_for 120 "node Ready" kubectl --kubeconfig "$FS_KUBECONFIG" wait --for=condition=Ready "node/$FS_NODE" --timeout=5s
}

fake_gpus() {
    # The kubelet rewrites status.capacity from its own view, but keeps extended resources it
    # does not manage (no device plugin owns nvidia.com/gpu here).
    kubectl --kubeconfig "$FS_KUBECONFIG" patch node "$FS_NODE" --subresource=status --type=json \
        -p "[{\"op\":\"add\",\"path\":\"/status/capacity/nvidia.com~1gpu\",\"value\":\"$1\"}]" >/dev/null
}

up() {
    [ -x "$K8S_BIN/kubelet" ] || die "no binaries in $K8S_BIN: run tests/e2e/cluster/build.sh"
    if [ -d "$FS_STATE" ]; then log "$FS_STATE exists: tearing the previous cluster down first"; down; fi
    local t0; t0=$(date +%s)
    mkdir -p "$FS_STATE/pids" "$FS_STATE/logs"
    certs
    network
    containerd_up
    control_plane_up
    node_up
    log "cluster up in $(( $(date +%s) - t0 )) s; export KUBECONFIG=$FS_KUBECONFIG"
}

stop_pid() {  # name: TERM, then KILL after 15 s
    local f=$FS_STATE/pids/$1 pid
    [ -f "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

kube_chains_cleanup() {
    local ipt t rule chain
    for ipt in iptables ip6tables; do
        command -v "$ipt" >/dev/null || continue
        for t in filter nat mangle; do
            { "$ipt" -t "$t" -S 2>/dev/null || true; } | { grep -E '^-A [A-Z]+ .*-j KUBE-' || true; } | while read -r rule; do
                case "$rule" in -A\ KUBE-*) continue ;; esac   # rules inside KUBE-* chains go with them
                eval "$ipt -t $t ${rule/-A /-D }" 2>/dev/null || true
            done
            for chain in $("$ipt" -t "$t" -S 2>/dev/null | awk '/^-N KUBE-/{print $2}'); do "$ipt" -t "$t" -F "$chain" 2>/dev/null || true; done
            for chain in $("$ipt" -t "$t" -S 2>/dev/null | awk '/^-N KUBE-/{print $2}'); do "$ipt" -t "$t" -X "$chain" 2>/dev/null || true; done
        done
    done
}

down() {
    [ -d "$FS_STATE" ] || { log "nothing to tear down ($FS_STATE absent)"; return 0; }
    local t0; t0=$(date +%s)
    stop_pid kube-proxy; stop_pid kubelet
    # Containers: kill every task (their shims exit with them), remove pod network namespaces.
    if [ -S "$CTRD_SOCK" ]; then
        local c
        for c in $(ctr -a "$CTRD_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
            ctr -a "$CTRD_SOCK" -n k8s.io tasks kill -s KILL "$c" >/dev/null 2>&1 || true
        done
        sleep 1
        for c in $(ctr -a "$CTRD_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
            ctr -a "$CTRD_SOCK" -n k8s.io tasks delete -f "$c" >/dev/null 2>&1 || true
        done
    fi
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cni-' || true); do
        # only namespaces attached to our bridge's subnet
        if ip netns exec "$ns" ip -4 -o addr 2>/dev/null | grep -q " ${FS_POD_CIDR%.0/*}\."; then
            ip netns delete "$ns" 2>/dev/null || true
        fi
    done
    local p
    for ((i=${#PROCS[@]}-1; i>=0; i--)); do stop_pid "${PROCS[i]}"; done
    # leftover shims of our containerd (their command line names our socket)
    for p in $(pgrep -f "containerd-shim.*$CTRD_SOCK" || true); do kill -KILL "$p" 2>/dev/null || true; done
    # iptables: kube-proxy's and the kubelet's KUBE-* chains (IPv4 and IPv6), then our own rules
    [ -x "$K8S_BIN/kube-proxy" ] && "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
    kube_chains_cleanup
    local rule
    while rule=$(iptables -S FORWARD | grep -- "--comment $FS_IPT_COMMENT" | head -1) && [ -n "$rule" ]; do
        eval "iptables ${rule/-A /-D }"
    done
    if ip link show "$FS_BRIDGE" >/dev/null 2>&1; then ip link delete "$FS_BRIDGE"; fi
    if [ -f "$FS_STATE/ip_forward.orig" ]; then cat "$FS_STATE/ip_forward.orig" > /proc/sys/net/ipv4/ip_forward; fi
    # mounts the kubelet and containerd left under the state dir, deepest first
    { findmnt -rn -o TARGET | grep "^$FS_STATE/" || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$FS_STATE"
    log "cluster down in $(( $(date +%s) - t0 )) s"
}

status() {
    local n
    for n in "${PROCS[@]}"; do
        if [ -f "$FS_STATE/pids/$n" ] && kill -0 "$(cat "$FS_STATE/pids/$n")" 2>/dev/null; then
            echo "$n: running (pid $(cat "$FS_STATE/pids/$n"))"
        else echo "$n: stopped"; fi
    done
    [ -f "$FS_KUBECONFIG" ] && kubectl --kubeconfig "$FS_KUBECONFIG" get nodes -o wide 2>/dev/null || true
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
