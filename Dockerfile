# The vdib service image.
#
#   CPU (default):  docker build -t vdib .
#   CUDA:           docker build -t vdib:cuda \
#                     --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                     --build-arg EXTRAS=gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#   Run:            docker run -p 8000:8000 -v "$PWD/checkpoints:/app/checkpoints:ro" vdib
#
# The install is the README's (scripts/setup): a venv, then
# `pip install -c constraints.txt -e .[extras]`. TORCH_INDEX only chooses which torch build the
# pinned version resolves to (CPU wheels by default; a CUDA index for the GPU image).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG EXTRAS=""
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_WAIT_POLICY=PASSIVE \
    DEBIAN_FRONTEND=noninteractive

# CUDA base images ship python3 without venv support
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
COPY . .

RUN python3 -m venv .venv \
 && .venv/bin/python -m pip install -q --upgrade pip \
 && PIP_EXTRA_INDEX_URL="${TORCH_INDEX}" .venv/bin/python -m pip install -q -c constraints.txt -e ".${EXTRAS:+[${EXTRAS}]}"

ENV PATH=/app/.venv/bin:${PATH} \
    VDIB_CHECKPOINTS_DIR=/app/checkpoints

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"]
CMD ["vdib", "serve", "--host", "0.0.0.0", "--port", "8000"]
