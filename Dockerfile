# The vdib service image.
#
#   CPU (default):  docker build -t vdib .
#   CUDA:           docker build -t vdib:cuda \
#                     --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                     --build-arg EXTRAS=gpu --build-arg TORCH=cuda .
#   Run:            docker run -p 8000:8000 -v "$PWD/checkpoints:/app/checkpoints:ro" vdib
#                   docker run -e VDIB_PORT=9000 -p 9000:9000 ... vdib     (another port: the log names it)
#                   -e VDIB_WORKERS=N: server processes (default: the cores the container may use)
#
# The install is the README's (scripts/setup), in two layers: the dependencies from
# pyproject.toml + constraints.txt first (rebuilt only when those change), then the source and
# the project itself without dependencies (a source edit rebuilds only that). TORCH=cpu (default)
# takes torch's CPU build; the build fails if a CUDA build came instead (e.g. the CPU wheel index
# was unreachable and the main index has only the CUDA build). BASE may name any image with
# python3 >= 3.11 (a locally built stand-in where the default cannot be pulled). Only features
# of the classic builder are used (Debian's docker.io, docker-compose 1.29).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG EXTRAS=""
ARG TORCH=cpu
ARG TORCH_INDEX
ARG PORT=8000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_WAIT_POLICY=PASSIVE \
    DEBIAN_FRONTEND=noninteractive

# CUDA base images ship python3 without venv support
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# the service's user: owns nothing under /app (code and venv are read-only to it)
RUN useradd --create-home --home-dir /home/vdib --uid 10001 --user-group --shell /usr/sbin/nologin vdib

WORKDIR /app

# 1. dependencies (this layer is cached until pyproject.toml, constraints.txt or scripts/setup change)
COPY pyproject.toml constraints.txt ./
COPY scripts/setup scripts/setup
RUN VDIB_TORCH="${TORCH}" VDIB_TORCH_INDEX="${TORCH_INDEX}" bash scripts/setup --deps-only "${EXTRAS}"
RUN if [ "${TORCH}" = cpu ]; then \
      .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else \
'CPU image with the CUDA torch build ' + torch.version.cuda + ': the CPU wheel index was not reachable')"; \
    fi

# 2. the source, then the project without dependencies
COPY . .
RUN bash scripts/setup --no-deps "${EXTRAS}"

ENV PATH=/app/.venv/bin:${PATH} \
    VDIB_CHECKPOINTS_DIR=/app/checkpoints \
    VDIB_PORT=${PORT} \
    NUMBA_CACHE_DIR=/tmp/vdib-numba-cache

USER vdib
EXPOSE ${PORT}
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VDIB_PORT', '8000'), timeout=2).status == 200 else 1)"]
# the port comes from VDIB_PORT (vdib serve's --port default), so the log names the port served
CMD ["vdib", "serve", "--host", "0.0.0.0"]
