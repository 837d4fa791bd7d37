#!/usr/bin/env bash
# Builds the CPU image on a machine without a Docker engine or a registry, and writes it as an OCI
# archive:
#
#   bash docker/build-local.sh            # -> build/imagetag-cpu.oci.tar
#
# 1. A Debian bookworm base with Python 3.11 and pip, made with debootstrap from Debian's mirror and kept
#    in a cache, stands in for python:3.11-slim-bookworm (Docker Hub cannot be reached).
# 2. buildah builds docker/Dockerfile on it, RUN steps included, with TORCH=pypi (PyTorch's CPU
#    index cannot be reached either). pip inside the build uses this machine's pip settings and
#    local package folders, bind-mounted read-only into each RUN (docker/pip_sources.py); they are
#    never copied into a layer.
# 3. The image goes to build/imagetag-cpu.oci.tar (docker/oci_archive.py finishes it for
#    `docker load`), labelled with the commit and the exact sources it was built from.
#
#   bash docker/build-local.sh --source-id   # prints the sources' id (what the image test compares)
#
# Needs root, and `apt-get install buildah debootstrap` (Debian 12). The cache (base rootfs and
# buildah's storage) is IMAGETAG_BUILD_CACHE, default ~/.cache/imagetag-build; delete it to start
# over. docker/README.md has the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

# Everything the build reads: the context that .dockerignore lets in, and the build's own files.
sources=(.dockerignore pyproject.toml README.md service inference weights/manifest.toml docker/constraints.txt
         docker/healthcheck.py docker/Dockerfile docker/build-local.sh docker/pip_sources.py docker/oci_archive.py)
# The git tree of those files as they are on disk, committed or not (.gitignore applies): equal ids,
# equal inputs. A commit id alone would not tell an archive built from a modified tree.
source_id() {
  local index
  index=$(mktemp -u)
  GIT_INDEX_FILE=$index git add -- "${sources[@]}" && GIT_INDEX_FILE=$index git write-tree
  rm -f "$index"
}
if [ "${1:-}" = --source-id ]; then
  source_id
  exit 0
fi

cache=${IMAGETAG_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imagetag-build}
archive=${IMAGETAG_IMAGE_ARCHIVE:-$repo/build/imagetag-cpu.oci.tar}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
packages=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
image=localhost/imagetag:cpu

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "build-local.sh: needs $tool (apt-get install buildah debootstrap)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build-local.sh: run as root (debootstrap, and buildah's chroot isolation)" >&2; exit 1; }

# vfs: the only storage driver that needs no kernel overlay support inside this kind of machine;
# a storage of our own, so that cleaning the cache never touches anyone else's images.
bah() { buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver vfs "$@"; }
started=$(date +%s)
mkdir -p "$cache" "$(dirname "$archive")"
# leftovers of an interrupted run (the storage is this script's own)
bah rm --all >/dev/null 2>&1 || true

# ---- 1. the base: same inputs, same cached rootfs and image
key=$(printf '%s\n' "$suite" "$mirror" "$packages" "base-v1" | sha256sum | cut -c1-12)
base=localhost/imagetag-base:$suite-python3.11-$key
rootfs_tar=$cache/base-$suite-$key.tar
if [ ! -s "$rootfs_tar" ]; then
  echo "== base: debootstrap $suite ($packages) from $mirror"
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  # What debootstrap leaves behind that an image must not carry: the downloaded .debs, the
  # package lists, logs, and the build machine's own name and resolver.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/var/log/* "$rootfs"/etc/hostname "$rootfs"/etc/resolv.conf "$rootfs"/root/.bash_history
  tar --numeric-owner --xattrs -C "$rootfs" -cf "$rootfs_tar.tmp" .
  mv "$rootfs_tar.tmp" "$rootfs_tar"
  rm -rf "$rootfs"
  trap - EXIT
fi
if ! bah inspect --type image "$base" >/dev/null 2>&1; then
  echo "== base: committing $base"
  container=$(bah from scratch)
  mountpoint=$(bah mount "$container")
  tar --numeric-owner --xattrs -C "$mountpoint" -xf "$rootfs_tar"
  bah umount "$container" >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --label org.opencontainers.image.base.name="debian:$suite (debootstrap $packages)" "$container"
  bah commit --rm "$container" "$base" >/dev/null
fi
container=$(bah from --pull-never "$base")
bah run --isolation chroot "$container" python3 --version
bah rm "$container" >/dev/null

# ---- 2. the image
revision=$(git rev-parse HEAD)
source=$(source_id)
pip_dir=$(mktemp -d)
volumes=(--volume "$pip_dir/pip.conf:/etc/pip.conf:ro")
while read -r path; do
  volumes+=(--volume "$path:$path:ro")
done < <(python3 docker/pip_sources.py "$pip_dir")
echo "== image: buildah bud docker/Dockerfile on $base (commit $revision, sources $source)"
bah bud --isolation chroot --format docker --layers=false \
  --file docker/Dockerfile \
  --build-arg BASE_IMAGE="$base" --build-arg TORCH=pypi \
  "${volumes[@]}" \
  --label org.opencontainers.image.revision="$revision" --label io.imagetag.source="$source" \
  --tag "$image" .
rm -rf "$pip_dir"

# ---- 3. the archive
echo "== archive: $archive"
work=$(mktemp -d)
bah inspect --type image "$image" >"$work/inspect.json"
size=$(bah images --format '{{.Size}}' "$image")
rm -f "$archive.tmp"
bah push "$image" "oci-archive:$archive.tmp:imagetag:cpu"
python3 docker/oci_archive.py "$archive.tmp" "$work/inspect.json" imagetag:cpu
mv "$archive.tmp" "$archive"
rm -rf "$work"
# Keep only the base: the archive is the product, and vfs keeps a full copy of every image.
bah rmi "$image" >/dev/null
bah images --format '{{.Name}}:{{.Tag}} {{.ID}}' | while read -r name id; do
  case "$name" in "$base") ;; *) bah rmi --force "$id" >/dev/null 2>&1 || true ;; esac
done
echo "== done in $(( $(date +%s) - started )) s: $archive ($(du -h "$archive" | cut -f1); image $size unpacked), sources $source"
