#!/usr/bin/env bash
# Generate the compose secrets: one bearer token per provider (the credential the
# orchestrator presents to that provider, and only to it) and the orchestrator's
# admin token (deploys models; the demo job holds it), and the attacker service's token
# (submits attack jobs; the attacker and the demo job hold it).
#   docker/secrets/provider-a.token provider-b.token provider-c.token admin.token
#   attacker.token
# Existing tokens are kept (so a running stack stays valid); --force makes new ones.
# Files are mode 0644: compose v1 bind-mounts secret files with the host file's owner
# and mode, and the services run as uid 10001. The directory is gitignored and is not
# part of any image's build context (.dockerignore).
#
# Usage: docker/make-secrets.sh [--force] [--dir DIR]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR="$HERE/secrets"
FORCE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --force) FORCE=1 ;;
    --dir) shift; DIR=$1 ;;
    -h|--help) awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$DIR"
made=()
NAMES=(provider-a provider-b provider-c admin attacker)
for name in "${NAMES[@]}"; do
  f="$DIR/$name.token"
  if [[ $FORCE -eq 1 || ! -s $f ]]; then
    # 32 random bytes, url-safe base64 (43 chars)
    python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$f.tmp"
    chmod 0644 "$f.tmp"
    mv "$f.tmp" "$f"
    made+=("$name")
  fi
  chmod 0644 "$f"
done
echo "secrets in $DIR: new: ${made[*]:-none}; kept: $((${#NAMES[@]} - ${#made[@]}))" >&2
