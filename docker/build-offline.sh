#!/usr/bin/env bash
# Build every QuMoS image without pulling from any image registry or reaching PyPI from
# a container (our CI machines: no registry, and containers cannot reach PyPI):
#   1. the base image python:3.11-slim, made locally (docker/build-base-image.sh:
#      debootstrap Debian bookworm from the apt mirror + docker import; skipped if present)
#   2. the wheelhouse docker/wheelhouse/ (docker/build-wheelhouse.sh, downloaded on the
#      host with the host's pip, at the versions of requirements.lock; skipped if it
#      already holds this pyproject's requirements at those versions)
#   3. the compose secrets (docker/make-secrets.sh; existing tokens are kept)
#   4. the images qumos-provider, qumos-orchestrator, qumos-attacker from the Dockerfile
#      an online build uses (--build-arg SERVICE=...), with --build-arg PIP_NO_INDEX=1
#      (wheelhouse only).
#   5. removes the images those builds superseded (dangling, label org.qumos.project=qumos)
# Afterwards `docker compose up` (or `docker-compose up`) starts the stack from them.
#
# Usage: docker/build-offline.sh [--force-base] [--force-wheels] [--only IMAGE...]
# Env: QUMOS_IMAGE_TAG=latest
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
TAG=${QUMOS_IMAGE_TAG:-latest}
BASE_ARGS=()
FORCE_WHEELS=0
IMAGES=(provider orchestrator attacker)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --force-base) BASE_ARGS+=(--force) ;;
    --force-wheels) FORCE_WHEELS=1 ;;
    --only) shift; IMAGES=(); while [[ $# -gt 0 && $1 != --* ]]; do IMAGES+=("$1"); shift; done; continue ;;
    -h|--help) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[build-offline %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T0=$(date +%s)
since() { echo "$(( $(date +%s) - $1 ))s"; }

if ! docker info >/dev/null 2>&1; then
  echo "error: the Docker daemon is not reachable: $(docker info 2>&1 | tail -n 1)" >&2
  exit 1
fi

# 1. base image
t=$(date +%s)
"$HERE/build-base-image.sh" "${BASE_ARGS[@]}"
log "base image python:3.11-slim ready ($(since "$t"))"

# 2. wheelhouse: re-download only when the requirements changed (or --force-wheels)
t=$(date +%s)
REQS=$(python3 "$HERE/requirements.py")
LOCK="$ROOT/requirements.lock"  # the exact versions (a constraint file)
WANT=$(printf '%s\n' "$REQS" | cat - "$LOCK" | sha256sum | cut -d' ' -f1)
STAMP="$HERE/wheelhouse/.requirements.sha256"
if [[ $FORCE_WHEELS -eq 1 || ! -f $STAMP || $(cat "$STAMP") != "$WANT" ]]; then
  # shellcheck disable=SC2086
  mapfile -t REQ_ARR <<<"$REQS"
  "$HERE/build-wheelhouse.sh" "${REQ_ARR[@]}" -c "$LOCK"
  echo "$WANT" >"$STAMP"
  log "wheelhouse downloaded ($(since "$t"))"
else
  log "wheelhouse up to date ($(ls "$HERE"/wheelhouse/*.whl | wc -l) wheels)"
fi

# 3. secrets
"$HERE/make-secrets.sh"

# 4. images, built side by side (legacy builder or BuildKit, whichever docker uses)
cd "$ROOT"
mkdir -p /tmp/qumos-build
pids=()
for img in "${IMAGES[@]}"; do
  (
    s=$(date +%s)
    # the build stage gets a tag too (a cache hit, no rebuild), so that only superseded
    # stages are left dangling for the clean-up below and the next build keeps its cache
    args=(--build-arg PIP_NO_INDEX=1 --build-arg "SERVICE=$img" -f Dockerfile)
    if docker build "${args[@]}" -t "qumos-$img:$TAG" . >"/tmp/qumos-build/$img.log" 2>&1 \
       && docker build "${args[@]}" --target build \
         -t "qumos-$img-build:$TAG" . >>"/tmp/qumos-build/$img.log" 2>&1; then
      log "image qumos-$img:$TAG built ($(since "$s")), $(docker image inspect -f '{{.Size}}' "qumos-$img:$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
    else
      log "image qumos-$img FAILED; last lines of /tmp/qumos-build/$img.log:"
      tail -n 25 "/tmp/qumos-build/$img.log" >&2
      exit 1
    fi
  ) &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
[[ $rc -eq 0 ]] || { log "image build failed"; exit 1; }
log "all images built in $(since "$T0")"

# 5. clean-up: every rebuild leaves the images it replaced behind, untagged (~5 GB a
# round; repeated builds filled this machine's disk). Remove the dangling ones that carry
# this project's label, nothing else.
freed=$(docker image prune -f --filter label=org.qumos.project=qumos 2>/dev/null | tail -n 1)
log "superseded qumos images removed (${freed:-nothing to remove})"
