#!/usr/bin/env bash
# The service now against an earlier commit, in one run on one machine: `benchmark.py` (embedded
# and naive, at one concurrency) on a worktree of BASE, then on this checkout, one after the other.
#
#   IMAGETAG_DETECTOR_WEIGHTS=../shared/weights/yolov8n-w8.pt bash load-tests/against_commit.sh 2fb6916 [benchmark.py options]
#
# Both use this checkout's .venv; BASE's code comes first on the path. Results go to
# load-tests/results/against-BASE/{base,now}/benchmark.md.
set -euo pipefail
base=${1:?usage: against_commit.sh BASE [benchmark.py options]}
shift
options=("$@")
[ ${#options[@]} -gt 0 ] || options=(--configs embedded naive --concurrency 32 --duration 20)
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -n "${IMAGETAG_DETECTOR_WEIGHTS:-}" ]; then  # the base runs elsewhere: relative paths would miss
  IFS=, read -ra weights <<< "$IMAGETAG_DETECTOR_WEIGHTS"
  IMAGETAG_DETECTOR_WEIGHTS=$(realpath "${weights[@]}" | paste -sd,)
  export IMAGETAG_DETECTOR_WEIGHTS
fi
worktree=$(mktemp -d)/base
git -C "$here" worktree add -q --detach "$worktree" "$base"
trap 'git -C "$here" worktree remove --force "$worktree"' EXIT
out=$here/load-tests/results/against-$base
for tree in "$worktree" "$here"; do
  name=$([ "$tree" = "$here" ] && echo now || echo base)
  echo "== $name: $(git -C "$tree" rev-parse --short HEAD)"
  (cd "$tree" && PYTHONPATH=$tree "$here/.venv/bin/python" load-tests/benchmark.py "${options[@]}" --out "$out/$name" \
     | grep -E '^\| (embedded|2 workers|naive) |^Models alone')
done
