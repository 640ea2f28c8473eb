#!/usr/bin/env bash
# Make the container tier runnable: install docker.io, docker-compose and debootstrap with
# apt if missing, start dockerd if it is not running (no systemd here) and wait for it,
# then build the local base image, wheelhouse and the three images (docker/build-offline.sh).
# If the engine cannot start, say why, loudly, and exit 1: the container tier is never
# skipped silently. Called by `./run test` (unless QUMOS_SKIP_CONTAINERS=1).
set -uo pipefail
cd "$(dirname "$0")/.."

die() {
  printf '\n############################################################\n' >&2
  printf 'docker: %s\n' "$@" >&2
  printf '############################################################\n\n' >&2
  exit 1
}

# --- Docker: packages, engine, images ---------------------------------------------------
prepare_docker() {
  local need=()
  command -v docker >/dev/null 2>&1 || need+=(docker.io)
  command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    need+=(docker-compose)
  fi
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
  if [ ${#need[@]} -gt 0 ]; then
    echo "docker: installing ${need[*]}" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        docker.io docker-compose debootstrap; } >/tmp/ci-apt.log 2>&1 \
      || { tail -n 20 /tmp/ci-apt.log >&2; die "apt-get could not install ${need[*]} (log: /tmp/ci-apt.log)"; }
  fi
  if ! docker info >/dev/null 2>&1; then
    echo "docker: starting dockerd (log: /tmp/dockerd.log)" >&2
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    echo $! >/tmp/dockerd.pid
    local i
    for i in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    if ! docker info >/dev/null 2>&1; then
      tail -n 25 /tmp/dockerd.log >&2
      die "the Docker engine did not start within 60s; reason above (from /tmp/dockerd.log):" \
          "    $(grep -iE 'level=(error|fatal)|failed' /tmp/dockerd.log | tail -n 1)" \
          "the container tier cannot run, so this test run fails."
    fi
  fi
  echo "docker: docker $(docker info --format '{{.ServerVersion}}') ($(docker info --format '{{.Driver}}')), compose: $(python3 tests/support/compose.py version --short 2>/dev/null || echo '?')" >&2
  local t0=$SECONDS
  docker/build-offline.sh || die "docker/build-offline.sh failed: no images for the container tier"
  echo "docker: base image, wheelhouse and images ready in $((SECONDS - t0))s" >&2
}

prepare_docker
