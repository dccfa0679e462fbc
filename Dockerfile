# Slimstore: one image for the API (`slim serve`), workers (`slim worker`) and `slim migrate`.
#
# CPU by default. For NVIDIA GPUs build with the CUDA wheels of PyTorch (they bundle the CUDA
# runtime; the host only needs the driver and the NVIDIA container toolkit):
#
#   docker build -t slimstore:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#
# A CUDA base image can be used instead of python:3.11-slim with --build-arg BASE_IMAGE=...
# (it must provide python3.11 and pip).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SLIM_DATA_DIR=/data \
    SLIM_HOST=0.0.0.0

WORKDIR /app

# PyTorch first, from the index that matches the device (CPU or CUDA), so `pip install .`
# below finds it satisfied and does not pull the default build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY core ./core
COPY storage ./storage
COPY runtime ./runtime
COPY service ./service
COPY worker ./worker
COPY cli ./cli
COPY client ./client
COPY migrations ./migrations
RUN pip install . \
    && useradd --system --uid 10001 --create-home slim \
    && mkdir -p /data \
    && chown slim /data

USER slim
VOLUME ["/data"]
EXPOSE 8000

ENTRYPOINT ["slim"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
