#!/usr/bin/env bash
# Download wheels for the container images' Python (CPython 3.11, glibc
# manylinux x86_64 -- what the local python:3.11-slim / Debian bookworm image
# runs) into docker/wheelhouse/, so images can be built with
#   pip install --no-index --find-links /wheels ...
# and no package index. The wheelhouse is gitignored.
#
# Usage:
#   docker/build-wheelhouse.sh [--clean] [--dest DIR] REQ... | -r FILE ...
#   e.g. docker/build-wheelhouse.sh numpy fastapi 'torch==2.13.0'
#        docker/build-wheelhouse.sh -r services/orchestrator/requirements.txt
# All arguments other than --clean/--dest are handed to `pip download`
# (requirement specifiers, -r FILE, -c FILE, ...). Running it again adds to
# the wheelhouse; files already present are reused, not downloaded again.
#
# Env: PYTHON=python3        interpreter whose pip does the download
#      TARGET_PY=3.11        target CPython version
#      TARGET_GLIBC_MINOR=36 newest manylinux_2_X tag accepted (bookworm: glibc 2.36)
#
# torch: pin it (torch==2.13.0). On this workplace pip finds a CPU build of
# 2.13.0 on local disk (find-links /opt/wheels from pip's config); an unpinned
# `torch` resolves to a multi-GB CUDA build.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEST="$HERE/wheelhouse"
CLEAN=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --clean) CLEAN=1 ;;
    --dest) shift; DEST=$1 ;;
    -h|--help) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0 ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
if [[ ${#ARGS[@]} -eq 0 ]]; then
  echo "usage: $0 [--clean] [--dest DIR] REQUIREMENT... | -r FILE" >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
TARGET_PY=${TARGET_PY:-3.11}
TARGET_GLIBC_MINOR=${TARGET_GLIBC_MINOR:-36}
ABI="cp${TARGET_PY/./}"

log() { printf '[build-wheelhouse %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

[[ $CLEAN -eq 1 ]] && rm -rf "$DEST"
mkdir -p "$DEST"

# pip (<24) does not expand manylinux_2_X to older glibc tags: list them all.
PLATFORMS=(--platform linux_x86_64 --platform manylinux2014_x86_64
           --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
for ((m = TARGET_GLIBC_MINOR; m >= 5; m--)); do
  PLATFORMS+=(--platform "manylinux_2_${m}_x86_64")
done

T0=$(date +%s.%N)
log "pip download -> $DEST (cp${TARGET_PY/./}, manylinux_2_${TARGET_GLIBC_MINOR}..manylinux1 x86_64)"
set +e
"$PYTHON" -m pip download --disable-pip-version-check --progress-bar off \
  --dest "$DEST" --only-binary=:all: \
  --implementation cp --python-version "$TARGET_PY" \
  --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" \
  "${ARGS[@]}"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  # Some requirement has no wheel (sdist only). If this host runs the same
  # CPython/arch, build the missing ones into wheels here instead.
  host=$("$PYTHON" -c 'import sys,platform; print(f"{sys.version_info[0]}.{sys.version_info[1]}-{platform.machine()}-{sys.platform}")')
  if [[ $host == "$TARGET_PY-x86_64-linux" ]]; then
    log "binary-only download failed (rc=$rc); falling back to 'pip wheel --prefer-binary' on this host ($host)"
    "$PYTHON" -m pip wheel --disable-pip-version-check --progress-bar off \
      --prefer-binary --find-links "$DEST" --wheel-dir "$DEST" "${ARGS[@]}"
  else
    log "binary-only download failed (rc=$rc) and host ($host) != target; cannot build sdists here"
    exit "$rc"
  fi
fi

# anything that is not a wheel would need a compiler/index at image build time
if compgen -G "$DEST/*.tar.gz" >/dev/null || compgen -G "$DEST/*.zip" >/dev/null; then
  log "warning: non-wheel files in $DEST: $(cd "$DEST" && ls *.tar.gz *.zip 2>/dev/null | tr '\n' ' ')"
fi

T1=$(date +%s.%N)
log "wheelhouse: $(ls "$DEST"/*.whl 2>/dev/null | wc -l) wheels, $(du -sh "$DEST" | cut -f1), $(awk -v a="$T0" -v b="$T1" 'BEGIN{printf "%.1f", b-a}')s"
