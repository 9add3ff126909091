# syntax=docker/dockerfile:1
#
# One image with every Testflinger binary:
#   testflinger-server             the API (default command)
#   testflinger-agent              an agent: testflinger-agent -c /etc/testflinger/agent.yaml
#   testflinger-device-connectors  run by the agent's *_command lines
#   testflinger                    the CLI
#
# Build:  docker build -t testflinger:dev .
# Agents whose devices are reached over SSH (noprovision, multi, reserve) need an ssh
# client in the image:  docker build --build-arg EXTRA_PACKAGES="openssh-client" ...
# qemu devices also need qemu: EXTRA_PACKAGES="openssh-client qemu-system-x86 qemu-utils".

# The toolchain the project is built and tested with (workspace MSRV: 1.89).
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------- builder
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole workspace (see .dockerignore for what is left out). Cargo.lock is honoured.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bins \
        -p testflinger-api -p testflinger-agent -p testflinger-connectors -p testflinger-cli \
 && mkdir -p /out \
 && for bin in testflinger-server testflinger-agent testflinger-device-connectors testflinger; do \
        install -m 0755 "target/release/$bin" /out/; \
    done

# ---------------------------------------------------------------------------- runtime
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG EXTRA_PACKAGES=""
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates ${EXTRA_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*

# Unprivileged user; its home holds the artifact store and the agents' work dirs, so
# named volumes mounted there start owned by it.
ARG UID=10001
RUN groupadd --system --gid ${UID} testflinger \
 && useradd --system --uid ${UID} --gid testflinger \
        --home-dir /var/lib/testflinger --shell /usr/sbin/nologin testflinger \
 && mkdir -p /var/lib/testflinger/data /var/lib/testflinger/agent /var/lib/testflinger/tokens \
        /etc/testflinger \
 && chown -R testflinger:testflinger /var/lib/testflinger

COPY --from=builder /out/ /usr/local/bin/

ENV DATA_PATH=/var/lib/testflinger/data \
    TESTFLINGER_BIND=0.0.0.0:8000 \
    TESTFLINGER_LOG_FORMAT=json
WORKDIR /var/lib/testflinger
USER testflinger:testflinger
EXPOSE 8000
VOLUME ["/var/lib/testflinger/data"]
CMD ["testflinger-server"]
