#!/usr/bin/env bash
# Builds the images the e2e cluster runs, with nothing pulled from a container registry:
#   registry.k8s.io/pause:3.6        a static C program (pause.c) in a FROM-scratch image
#   fleetserve-e2e/python:3.11-bookworm  a debootstrapped Debian bookworm rootfs with python3 + pip
#   fleetserve/runtime:e2e-cpu       Dockerfile.runtime, VARIANT=cpu, on that base
#   fleetserve/operator:e2e          Dockerfile.operator on that base
# and saves them to $FS_CACHE/images/*.tar, which cluster.sh imports into the cluster's containerd.
# A private dockerd (no bridge, no iptables, builds use the host network) runs for the build only;
# its data root is cached under $FS_CACHE/docker, so unchanged layers are not rebuilt.
source "$(dirname "$0")/lib.sh"
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)
DSTATE=/tmp/fleetserve-e2e-docker
BASE_IMAGE=fleetserve-e2e/python:3.11-bookworm
RUNTIME_IMAGE=${FS_RUNTIME_IMAGE:-fleetserve/runtime:e2e-cpu}
OPERATOR_IMAGE=${FS_OPERATOR_IMAGE:-fleetserve/operator:e2e}
export DOCKER_HOST=unix://$DSTATE/docker.sock
PIDS=()

cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$p" 2>/dev/null || true
    done
    { findmnt -rn -o TARGET | grep "^$DSTATE/" || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$DSTATE"
}
trap cleanup EXIT

dockerd_up() {
    rm -rf "$DSTATE"; mkdir -p "$DSTATE" "$FS_CACHE/docker"
    dockerd --data-root "$FS_CACHE/docker" --exec-root "$DSTATE/exec" --pidfile "$DSTATE/dockerd.pid" \
        -H "$DOCKER_HOST" --bridge none --iptables=false --ip-masq=false --ip-forward=false \
        --oom-score-adjust 0 > "$DSTATE/dockerd.log" 2>&1 &
    PIDS+=($!)
    local end=$(( $(date +%s) + 60 ))
    until docker version >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || { tail -20 "$DSTATE/dockerd.log"; die "dockerd did not start"; }
        sleep 1
    done
}

pause_image() {
    docker image inspect "$PAUSE_IMAGE" >/dev/null 2>&1 && return 0
    local d; d=$(mktemp -d)
    gcc -static -Os -o "$d/pause" "$HERE/pause.c"
    printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' > "$d/Dockerfile"
    docker build -q -t "$PAUSE_IMAGE" "$d" >/dev/null
    rm -rf "$d"
}

base_image() {
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
    local tar=$FS_CACHE/base/bookworm-python3.tar
    if [ ! -f "$tar" ]; then
        local root; root=$(mktemp -d)
        log "debootstrap bookworm (python3, pip)"
        debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
            bookworm "$root" http://deb.debian.org/debian > "$DSTATE/debootstrap.log" 2>&1 \
            || { tail -20 "$DSTATE/debootstrap.log"; die "debootstrap failed"; }
        # pip installs into the image's system Python (as python:3.11-slim's pip does)
        rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
        chroot "$root" apt-get clean
        rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
        mkdir -p "$(dirname "$tar")"
        tar -C "$root" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
        rm -rf "$root"
    fi
    docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tar" "$BASE_IMAGE-rootfs" >/dev/null
    # This machine's CA bundle: the registries it reaches may sit behind a TLS proxy of its own.
    local d; d=$(mktemp -d)
    cp /etc/ssl/certs/ca-certificates.crt "$d/"
    printf 'FROM %s\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n' "$BASE_IMAGE-rootfs" > "$d/Dockerfile"
    docker build -q -t "$BASE_IMAGE" "$d" >/dev/null
    rm -rf "$d"
}

wheel_server() {
    # The CPU torch wheel as the host's pip resolves it (constraints/cpu.txt), served to the build
    # on 127.0.0.1 only: PyPI's default torch wheel would pull CUDA.
    mkdir -p "$FS_CACHE/wheels"
    python3 -m pip download -q --no-deps -d "$FS_CACHE/wheels" -c "$REPO/constraints/cpu.txt" torch
    python3 -m http.server --bind 127.0.0.1 --directory "$FS_CACHE/wheels" 0 > "$DSTATE/wheels.log" 2>&1 &
    PIDS+=($!)
    local end=$(( $(date +%s) + 20 ))
    until grep -qo 'port [0-9]*' "$DSTATE/wheels.log"; do
        [ "$(date +%s)" -lt "$end" ] || die "wheel server did not start"; sleep 0.3
    done
    WHEELS_URL="http://127.0.0.1:$(grep -o 'port [0-9]*' "$DSTATE/wheels.log" | head -1 | cut -d' ' -f2)/"
}

save() {  # image, file: docker save only when the image changed
    local id; id=$(docker image inspect -f '{{.Id}}' "$1")
    local out=$FS_CACHE/images/$2.tar
    if [ -f "$out" ] && [ "$(cat "$out.id" 2>/dev/null)" = "$id" ]; then return 0; fi
    log "docker save $1"
    docker save -o "$out.tmp" "$1" && mv "$out.tmp" "$out" && echo "$id" > "$out.id"
}

t0=$(date +%s)
mkdir -p "$FS_CACHE/images"
dockerd_up
pause_image
base_image
log "base images ready ($(( $(date +%s) - t0 )) s)"
wheel_server
log "docker build $RUNTIME_IMAGE"
docker build -q --network host -f "$REPO/Dockerfile.runtime" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg VARIANT=cpu --build-arg "PIP_FIND_LINKS=$WHEELS_URL" -t "$RUNTIME_IMAGE" "$REPO" >/dev/null
log "docker build $OPERATOR_IMAGE"
docker build -q --network host -f "$REPO/Dockerfile.operator" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -t "$OPERATOR_IMAGE" "$REPO" >/dev/null
save "$PAUSE_IMAGE" pause
save "$RUNTIME_IMAGE" runtime
save "$OPERATOR_IMAGE" operator
log "images ready in $(( $(date +%s) - t0 )) s"
