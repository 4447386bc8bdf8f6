# One image for the gateway and the shard workers; docker-compose.yml picks the command.
# CPU and CUDA (docker-compose.cuda.yml) use it as it is: PyPI's torch wheel carries its CUDA libraries.
# Ascend (docker-compose.ascend.yml) builds it FROM a CANN image for the chip, which sets the CANN
# environment, with EXTRAS=npu and TORCH_NPU set to the torch_npu release built for the torch pinned
# in constraints.txt (torch_npu X.Y.Z pairs with torch X.Y.Z, and needs a CANN version it supports).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG EXTRAS=
ARG TORCH_NPU=
ENV PYTHONUNBUFFERED=1 BLOOMDUO_LOG_FORMAT=json BLOOMDUO_CACHE=/cache
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY proto proto
COPY bloomduo bloomduo
COPY gateway gateway
COPY shard_worker shard_worker
COPY client client
# torch (and torch_npu) first, pinned together, so that installing bloomduo keeps them. The install builds
# the CPU worker's own kernels (shard_worker/_kernels.c) with a C compiler: added for the build where the
# base image has none and apt, and removed again in the same layer; without one the workers use torch's.
RUN set -e; added=; \
    if ! command -v gcc >/dev/null && command -v apt-get >/dev/null; then \
        apt-get update; apt-get install -y --no-install-recommends gcc libc6-dev; added=1; \
    fi; \
    pip install --no-cache-dir -c constraints.txt torch ${TORCH_NPU:+"torch_npu==${TORCH_NPU}"}; \
    pip install --no-cache-dir -c constraints.txt ".${EXTRAS:+[${EXTRAS}]}"; \
    if [ -n "$added" ]; then apt-get purge -y --auto-remove gcc libc6-dev; rm -rf /var/lib/apt/lists/*; fi
USER 65534:65534
ENTRYPOINT ["bloomduo"]
