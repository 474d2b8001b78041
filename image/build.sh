#!/usr/bin/env bash
# Build the project's container image (`make image`).
#
# With a Docker daemon: `docker build` from the Dockerfile's default base
# (python:3.11-slim-bookworm). Without one (this machine: no daemon, no Docker Hub): buildah,
# FROM a Debian bookworm base made here with debootstrap from Debian's own mirror and tagged
# $BASE_TAG; it is made once and reused.
#
# Settings (environment; the Makefile passes its variables):
#   IMAGE           tag to build (required; the Makefile reads pipeline/kfp_components.py)
#   BASE_TAG        local base image tag              (localhost/skinlesion-base:bookworm)
#   ENGINE          auto | docker | buildah           (auto: docker if `docker info` answers)
#   STORAGE_DRIVER  buildah storage driver            (overlay; vfs works too, with a full
#                   copy of the ~10 GB tree per layer)
#   WORK_DIR        debootstrap scratch folder        (/var/tmp/skinlesion-image)
#   DEBIAN_MIRROR   mirror for debootstrap            (http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$0")/.."

: "${IMAGE:?IMAGE must name the tag to build}"
BASE_TAG=${BASE_TAG:-localhost/skinlesion-base:bookworm}
ENGINE=${ENGINE:-auto}
STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}
WORK_DIR=${WORK_DIR:-/var/tmp/skinlesion-image}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [[ $ENGINE == auto ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
    elif command -v buildah >/dev/null; then ENGINE=buildah
    else
        echo "image_build: no Docker daemon answers and buildah is not installed" >&2
        echo "  (Debian: apt-get install -y buildah debootstrap)" >&2
        exit 1
    fi
fi

start=$(date +%s)
if [[ $ENGINE == docker ]]; then
    docker build -t "$IMAGE" .
else
    buildah=(buildah --storage-driver "$STORAGE_DRIVER")

    if ! "${buildah[@]}" inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
        echo "== base $BASE_TAG: debootstrap Debian bookworm (python3 3.11) from $DEBIAN_MIRROR"
        rootfs="$WORK_DIR/rootfs-bookworm"
        mkdir -p "$WORK_DIR"
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$DEBIAN_MIRROR"
        # the same suites as Debian's own images: updates and security fixes too
        printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
            "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" > "$rootfs/etc/apt/sources.list"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        ctr=$("${buildah[@]}" from scratch)
        mnt=$("${buildah[@]}" mount "$ctr")
        cp -a "$rootfs"/. "$mnt"/
        "${buildah[@]}" unmount "$ctr"
        "${buildah[@]}" config --env LANG=C.UTF-8 --cmd /bin/bash \
            --label org.opencontainers.image.description="Debian bookworm minbase + python3, debootstrap" "$ctr"
        "${buildah[@]}" commit --rm "$ctr" "$BASE_TAG"
        rm -rf "$rootfs"
    fi

    # pip inside the build reaches the package registry through this machine's TLS-inspecting
    # proxy: the CA bundle is mounted for the RUN steps, never copied into the image. Debian's
    # venv pip reads /etc/ssl/certs itself, so no pip config is mounted: the host's
    # /etc/pip.conf only names that bundle, /etc/xdg/pip only caps torch/torchvision at the
    # versions pyproject pins, and root's local file indexes are for the host's venvs.
    # --layers: the dependency layer is reused while pyproject.toml does not change.
    "${buildah[@]}" bud --isolation chroot --layers \
        --build-arg BASE_IMAGE="$BASE_TAG" \
        --volume /etc/ssl/certs:/etc/ssl/certs:ro \
        -t "$IMAGE" -f Dockerfile .
fi
echo "== built $IMAGE with $ENGINE in $(( $(date +%s) - start )) s"
