# vla-dist image: runs the quickstart (Genesis offscreen rendering via EGL/Mesa, Ray, DeepSpeed).
#   CPU:  docker build -t vla-dist .
#   CUDA: docker build -t vla-dist:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                      --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   run:  docker run --rm -v $PWD/data:/app/data -v $PWD/runs:/app/runs vla-dist vla-dist collect
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# torch build: the CPU wheel index by default; a CUDA index for GPU images.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VLA_DIST_CACHE_DIR=/cache/vla-dist \
    PYOPENGL_PLATFORM=egl

# Offscreen rendering without a display: EGL through Mesa (llvmpipe on CPU), OSMesa as a fallback.
# The CUDA base images have no Python; install one there.
RUN apt-get update && apt-get install -y --no-install-recommends \
        libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 libgl1 libglx0 libopengl0 libosmesa6 \
        libglib2.0-0 libxrender1 git \
    && (command -v python3.11 >/dev/null || apt-get install -y --no-install-recommends python3 python3-pip python3-venv) \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY vla_dist ./vla_dist
COPY configs ./configs
RUN pip install -e .
COPY . .

# Compile caches (Genesis kernels ~3 min cold) live in a volume-friendly path: mount /cache to keep them.
VOLUME ["/cache"]
CMD ["vla-dist", "collect"]
