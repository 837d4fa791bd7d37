#!/usr/bin/env bash
# Copies this machine's redis-server, with the shared libraries it loads beyond the C runtime,
# into DEST, and writes DEST/redis-server, a wrapper that runs it against them: for a machine
# that has no redis-server (the lent GPU machine), where `gpu_benchmark.py --redis-server
# DEST/redis-server` then measures the gateways configuration too. The Debian 12 binary needs
# glibc 2.34 or later there.
#
#   bash load-tests/carry_redis_server.sh gpu-carry/redis     # then carry gpu-carry
set -euo pipefail
dest=${1:?usage: carry_redis_server.sh DEST}
binary=$(command -v redis-server)
mkdir -p "$dest/lib"
cp "$binary" "$dest/redis-server.bin"
# Every library but glibc's own (libc, libm, the loader) and the compiler runtime, which any
# Linux with Python has.
ldd "$binary" | awk '$3 ~ /^\// {print $3}' \
  | grep -Ev '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libgcc_s|libstdc\+\+)\.so' \
  | xargs -I{} cp -L {} "$dest/lib/"
cat > "$dest/redis-server" <<'WRAPPER'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"
WRAPPER
chmod +x "$dest/redis-server"
"$dest/redis-server" --version
du -sh "$dest"
