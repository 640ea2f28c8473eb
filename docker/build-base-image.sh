#!/usr/bin/env bash
# Build a local stand-in for the `python:3.11-slim` base image WITHOUT pulling
# from any image registry: debootstrap a minimal Debian bookworm (whose python3
# is 3.11) from the same Debian mirror apt uses on this machine, then
# `docker import` it under the tag python:3.11-slim so that Dockerfiles saying
# `FROM python:3.11-slim` resolve locally (docker build does not pull an image
# that already exists locally unless --pull is given).
#
# Usage: docker/build-base-image.sh [--force] [--no-upgrade] [--host-ca] [--tag NAME]...
#   --force       rebuild even if python:3.11-slim already exists
#   --no-upgrade  skip applying bookworm-updates / bookworm-security upgrades
#   --host-ca     also trust this host's local CAs (/usr/local/share/ca-certificates),
#                 needed only for HTTPS from containers behind a TLS-intercepting proxy
#   --tag NAME    extra tag(s) (python:3.11-slim is always set)
# Env: DEBIAN_MIRROR=http://...     override the mirror read from apt's sources
#      DEBIAN_SECURITY_MIRROR=...   override the security mirror
#
# Requires root (debootstrap), a running Docker daemon and the `debootstrap`
# package (installed with apt-get if missing).
set -euo pipefail

TAG="python:3.11-slim"
EXTRA_TAGS=("python:3.11-slim-bookworm")
FORCE=0
UPGRADE=1
HOST_CA=0
SUITE=bookworm
PACKAGES="python3,python3-venv,python3-pip,python-is-python3,ca-certificates"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --force) FORCE=1 ;;
    --no-upgrade) UPGRADE=0 ;;
    --host-ca) HOST_CA=1 ;;
    --tag) shift; EXTRA_TAGS+=("$1") ;;
    -h|--help) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[build-base-image %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
T0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T0 ))s"; }

if ! docker info >/dev/null 2>&1; then
  echo "error: Docker daemon not reachable (start it: dockerd >/tmp/dockerd.log 2>&1 &)" >&2
  exit 1
fi

if [[ $FORCE -eq 0 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
  log "image $TAG already exists; skipping (use --force to rebuild)"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "error: debootstrap needs root" >&2
  exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null \
    || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap >/dev/null; }
fi

# --- find the Debian mirror apt uses here -----------------------------------
# Looks at deb822 *.sources ("URIs:") and one-line *.list / sources.list
# ("deb URI suite ..."), skipping disabled files; first non-security URI wins.
apt_uris() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] && awk 'tolower($1)=="uris:" {for (i=2;i<=NF;i++) print $i}' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] && awk '$1=="deb" { for (i=2;i<=NF;i++) if ($i !~ /^\[/ && $i !~ /\]$/ && $i !~ /=/) { print $i; break } }' "$f"
  done
}
if [[ -z ${DEBIAN_MIRROR:-} ]]; then
  DEBIAN_MIRROR=$(apt_uris | grep -E '/debian/?$' | grep -v security | head -n1 || true)
fi
if [[ -z ${DEBIAN_SECURITY_MIRROR:-} ]]; then
  DEBIAN_SECURITY_MIRROR=$(apt_uris | grep -E 'debian-security/?$' | head -n1 || true)
fi
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_MIRROR=${DEBIAN_MIRROR%/}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-${DEBIAN_MIRROR%/debian}/debian-security}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR%/}
log "mirror: $DEBIAN_MIRROR  security: $DEBIAN_SECURITY_MIRROR"

ROOT=$(mktemp -d /var/tmp/qumos-rootfs.XXXXXX)
cleanup() {
  # unmount anything left mounted inside the rootfs before deleting it
  for m in proc sys dev/pts dev; do
    mountpoint -q "$ROOT/$m" 2>/dev/null && umount -l "$ROOT/$m" || true
  done
  rm -rf --one-file-system "$ROOT"
}
trap cleanup EXIT

# --- debootstrap ---------------------------------------------------------------
log "debootstrap --variant=minbase $SUITE ($PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" \
  "$SUITE" "$ROOT" "$DEBIAN_MIRROR" >/tmp/qumos-debootstrap.log 2>&1 \
  || { tail -n 30 /tmp/qumos-debootstrap.log >&2; exit 1; }
log "debootstrap done ($(elapsed))"

# apt sources inside the image (same mirror), so `apt-get update` works in builds
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR $SUITE main
deb $DEBIAN_MIRROR $SUITE-updates main
deb $DEBIAN_SECURITY_MIRROR $SUITE-security main
EOF

# slim: keep docs/man/locales out of this and any later apt-get install
cat >"$ROOT/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
cat >"$ROOT/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
APT::Install-Recommends "false";
EOF

if [[ $UPGRADE -eq 1 ]]; then
  log "applying $SUITE-updates/$SUITE-security upgrades"
  mount -t proc proc "$ROOT/proc"
  chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -qq && apt-get -y -qq -o Dpkg::Options::=--force-confold dist-upgrade' \
    >/tmp/qumos-upgrade.log 2>&1 || { tail -n 30 /tmp/qumos-upgrade.log >&2; exit 1; }
  umount "$ROOT/proc"
  log "upgrade done ($(elapsed))"
fi

if [[ $HOST_CA -eq 1 ]] && compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  log "adding host CAs: $(cd /usr/local/share/ca-certificates && echo *.crt)"
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
  chroot "$ROOT" update-ca-certificates >/dev/null 2>&1
fi

# Behave like the official image: system pip may install (no PEP 668 marker)
rm -f "$ROOT"/usr/lib/python3*/EXTERNALLY-MANAGED

# --- clean ---------------------------------------------------------------------
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/apt/archives/partial/* \
       "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/lib/apt/lists/* \
       "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old \
       "$ROOT"/var/log/* "$ROOT"/tmp/* "$ROOT"/var/tmp/* \
       "$ROOT"/usr/share/info/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/lintian/*
find "$ROOT/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$ROOT/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
find "$ROOT/usr" -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
: >"$ROOT/etc/resolv.conf"
: >"$ROOT/etc/hostname"
rm -f "$ROOT/etc/machine-id" "$ROOT/var/lib/dbus/machine-id"
log "rootfs size: $(du -sh --one-file-system "$ROOT" | cut -f1)"

# --- import -------------------------------------------------------------------
PYVER=$(chroot "$ROOT" python3 -c 'import platform; print(platform.python_version())')
log "python in rootfs: $PYVER"
tar --numeric-owner -C "$ROOT" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "ENV PYTHON_VERSION=$PYVER" \
  --change 'LABEL org.opencontainers.image.description=local-debootstrap-bookworm-python3' \
  --change 'CMD ["python3"]' \
  - "$TAG" >/dev/null
for t in "${EXTRA_TAGS[@]}"; do docker tag "$TAG" "$t"; done

log "imported $TAG (+ ${EXTRA_TAGS[*]}) size $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.1f MB", $1/1e6}') total $(elapsed)"

# --- smoke test ----------------------------------------------------------------
docker run --rm --network none "$TAG" sh -c 'python3 -m venv /tmp/v && /tmp/v/bin/python -c "import ssl, sqlite3, venv" && echo venv-ok' >&2
log "done in $(elapsed)"
