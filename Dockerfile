# The QuMoS service images, one Dockerfile for the three: SERVICE picks the service (its
# pyproject extra and its app). Build from the repository root:
#   docker build --build-arg SERVICE=provider -t qumos-provider .
#   docker build --build-arg SERVICE=orchestrator -t qumos-orchestrator .
#   docker build --build-arg SERVICE=attacker -t qumos-attacker .
# Online this installs from PyPI. Offline (docker/build-offline.sh) it installs only
# from the local wheelhouse: --build-arg PIP_NO_INDEX=1. The base image
# python:3.11-slim is either the official one or the local debootstrap stand-in
# (docker/build-base-image.sh); nothing else is pulled.
FROM python:3.11-slim AS build
# (the label lets docker/build-offline.sh remove this project's superseded images only)
LABEL org.qumos.project=qumos
ARG SERVICE
ARG PIP_NO_INDEX=0
# the attacker's torch: the CPU build (an unpinned PyPI torch is a multi-GB CUDA build);
# unused offline, and by the services without torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_INDEX=${PIP_NO_INDEX} PIP_FIND_LINKS=/wheels PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# the extras per service: the provider's includes `quantum`; the attacker adds `quantum` for
# the compose demo job it also runs (its deploy computes the canaries on Aer); the
# orchestrator has neither qiskit nor torch
RUN case "$SERVICE" in \
      provider) echo "provider" ;; orchestrator) echo "orchestrator" ;; \
      attacker) echo "attacker quantum" ;; \
      *) echo "error: --build-arg SERVICE=provider|orchestrator|attacker (got '$SERVICE')" >&2; exit 1 ;; \
    esac > /extras
COPY docker/wheelhouse/ /wheels/
COPY pyproject.toml requirements.lock docker/requirements.py /src/
# dependencies first (a layer that survives code changes): core + the service's extras,
# every version from the lock (a constraint file)
RUN if [ "$SERVICE" = attacker ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && python3 /src/requirements.py --pyproject /src/pyproject.toml $(cat /extras) >/src/requirements.txt \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /src/requirements.txt -c /src/requirements.lock
COPY README.md /src/
COPY shared/ /src/shared/
COPY services/ /src/services/
# then slim the venv: no pip or setuptools at run time (23 MB), no numpy test suite (17 MB);
# only the attacker trains (torch); the orchestrator carries no simulator either
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation "/src[$(cat /extras | tr ' ' ',')]" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -m pip uninstall -q -y pip setuptools \
 && rm -rf /opt/venv/lib/python3.11/site-packages/numpy/tests \
           /opt/venv/lib/python3.11/site-packages/numpy/*/tests \
 && forbidden=""; \
    if [ "$SERVICE" != attacker ]; then forbidden="torch"; fi; \
    if [ "$SERVICE" = orchestrator ]; then forbidden="torch qiskit qiskit_aer"; fi; \
    for m in $forbidden; do \
      if /opt/venv/bin/python -c "import $m" 2>/dev/null; then echo "error: $m must not be in the $SERVICE image" >&2; exit 1; fi; \
    done

FROM python:3.11-slim
LABEL org.qumos.project=qumos
ARG SERVICE
RUN groupadd --gid 10001 qumos \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin qumos \
 && mkdir -p /data && chown 10001:10001 /data && chmod 0750 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    MPLCONFIGDIR=/tmp QUMOS_SERVICE=${SERVICE}
USER 10001:10001
WORKDIR /data
EXPOSE 8000
# python (no curl in the image); http.client and -S keep it light on a loaded machine
HEALTHCHECK --interval=5s --timeout=15s --start-period=180s --retries=5 \
  CMD ["python3", "-S", "-c", "import http.client as h; c = h.HTTPConnection('127.0.0.1', 8000, timeout=10); c.request('GET', '/readyz'); raise SystemExit(c.getresponse().status != 200)"]
# the shell only names the app; exec hands the process (and its signals) to uvicorn
CMD ["sh", "-c", "exec uvicorn --factory \"services.${QUMOS_SERVICE}.app:create_app\" --host 0.0.0.0 --port 8000"]
