#!/usr/bin/env bash
# Builds an image on a machine without a Docker engine or a registry, and writes it as an OCI
# archive:
#
#   bash docker/build-local.sh [cpu]     # docker/Dockerfile      -> build/imagetag-cpu.oci.tar
#   bash docker/build-local.sh cuda      # docker/Dockerfile.cuda -> build/imagetag-worker-cuda.oci.tar
#   bash docker/build-local.sh --source-id [cpu|cuda]   # the id of the sources (what the image test compares)
#
# 1. A Debian bookworm base with Python 3.11 and pip, made with debootstrap from Debian's mirror
#    and kept in a cache, stands in for the official bases (Docker Hub cannot be reached).
# 2. buildah builds the Dockerfile on it, RUN steps included: the CPU image with TORCH=pypi
#    (PyTorch's CPU index cannot be reached either), the CUDA one with PYTHON=python-base (uv
#    downloads Python from GitHub). pip inside the build uses this machine's pip settings and local
#    package folders, bind-mounted read-only into each RUN (docker/pip_sources.py); they are never
#    copied into a layer.
# 3. The image goes to the archive (docker/oci_archive.py finishes it for `docker load`), labelled
#    with the commit and the exact sources it was built from. IMAGETAG_IMAGE_ARCHIVE overrides
#    the archive's path.
#
# Needs root, and `apt-get install buildah debootstrap` (Debian 12). The cache (base rootfs and
# buildah's storage) is IMAGETAG_BUILD_CACHE, default ~/.cache/imagetag-build; delete it to start
# over. docker/README.md has the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

mode=build
if [ "${1:-}" = --source-id ]; then
  mode=source-id
  shift
fi
flavour=${1:-cpu}
case "$flavour" in
  cpu) dockerfile=docker/Dockerfile; name=imagetag-cpu; reference=imagetag:cpu; build_args=(--build-arg TORCH=pypi) ;;
  cuda) dockerfile=docker/Dockerfile.cuda; name=imagetag-worker-cuda; reference=imagetag:worker-cuda
        build_args=(--build-arg PYTHON=python-base) ;;
  *) echo "usage: build-local.sh [--source-id] [cpu|cuda]" >&2; exit 2 ;;
esac

# Everything the build reads: the context that .dockerignore lets in, and the build's own files.
sources=(.dockerignore pyproject.toml README.md service inference docker/constraints.txt
         docker/healthcheck.py "$dockerfile" docker/build-local.sh docker/pip_sources.py docker/oci_archive.py)
# The git tree of those files as they are on disk, committed or not (.gitignore applies): equal ids,
# equal inputs. A commit id alone would not tell an archive built from a modified tree.
source_id() {
  local index
  index=$(mktemp -u)
  GIT_INDEX_FILE=$index git add -- "${sources[@]}" && GIT_INDEX_FILE=$index git write-tree
  rm -f "$index"
}
if [ "$mode" = source-id ]; then
  source_id
  exit 0
fi

cache=${IMAGETAG_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imagetag-build}
archive=${IMAGETAG_IMAGE_ARCHIVE:-$repo/build/$name.oci.tar}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
packages=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
image=localhost/$reference

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "build-local.sh: needs $tool (apt-get install buildah debootstrap)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "build-local.sh: run as root (debootstrap, and buildah's chroot isolation)" >&2; exit 1; }

# vfs: no overlay support needed from the kernel or from fuse; a storage of our own, so that
# cleaning it never touches anyone else's images.
bah() { buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver vfs "$@"; }
started=$(date +%s)
mkdir -p "$cache" "$(dirname "$archive")"
# One build at a time per cache: runs clean up the storage they share (the machine is shared, and
# CI may run beside a developer).
exec 9>"$cache/lock"
flock 9
# vfs keeps a full copy of the filesystem per stage and per commit: the build peaks at about 20 GB
# (measured). Refuse early rather than fill a disk that others share.
need_gb=22
free_gb=$(( $(df --output=avail -k "$cache" | tail -1) / 1024 / 1024 ))
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "build-local.sh: $free_gb GB free under $cache, the build needs about $need_gb GB" >&2
  exit 1
fi
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
targets=(/etc/pip.conf)
while read -r path; do
  targets+=("$path")
done < <(python3 docker/pip_sources.py "$pip_dir")
volumes=(--volume "$pip_dir/pip.conf:/etc/pip.conf:ro")
for target in "${targets[@]:1}"; do
  volumes+=(--volume "$target:$target:ro")
done
echo "== image: buildah bud $dockerfile on $base (commit $revision, sources $source)"
bah bud --isolation chroot --format docker --layers=false \
  --file "$dockerfile" \
  --build-arg BASE_IMAGE="$base" "${build_args[@]}" \
  "${volumes[@]}" \
  --label org.opencontainers.image.revision="$revision" --label io.imagetag.source="$source" \
  --tag "$image" .
rm -rf "$pip_dir"

# buildah leaves an empty file or folder in the image wherever it mounted a --volume (and the
# folders above it that the base did not have). Remove them, and squash the image into one layer
# so that no layer holds them either. Non-empty files (the base's own CA bundle) stay.
echo "== image: removing the mount points, squashing"
container=$(bah from --pull-never "$image")
root=$(bah mount "$container")
in_base=$(tar -tf "$rootfs_tar")
for target in "${targets[@]}"; do
  path=$target
  while [ "$path" != / ] && ! grep -qxF ".$path" <<<"$in_base" && ! grep -qxF ".$path/" <<<"$in_base"; do
    if [ -f "$root$path" ] && [ ! -s "$root$path" ]; then
      rm -f "$root$path"
    elif [ -d "$root$path" ] && [ -z "$(ls -A "$root$path")" ]; then
      rmdir "$root$path"
    else
      break
    fi
    path=$(dirname "$path")
  done
done
bah umount "$container" >/dev/null
bah commit --rm --squash --format docker "$container" "$image" >/dev/null

# ---- 3. the archive
echo "== archive: $archive"
work=$(mktemp -d)
bah inspect --type image "$image" >"$work/inspect.json"
size=$(bah images --format '{{.Size}}' "$image")
rm -f "$archive.tmp"
bah push "$image" "oci-archive:$archive.tmp:$reference"
python3 docker/oci_archive.py "$archive.tmp" "$work/inspect.json" "$reference"
mv "$archive.tmp" "$archive"
rm -rf "$work"
# Keep only the base: the archive is the product, and vfs keeps a full copy of every image.
bah rmi "$image" >/dev/null
bah images --format '{{.Name}}:{{.Tag}} {{.ID}}' | while read -r name id; do
  case "$name" in "$base") ;; *) bah rmi --force "$id" >/dev/null 2>&1 || true ;; esac
done
echo "== done in $(( $(date +%s) - started )) s: $archive ($(du -h "$archive" | cut -f1); image $size unpacked), sources $source"
