# syntax=docker/dockerfile:1
# The parleyd image: `docker build -t parley:dev .` (docker compose up --build does it).
# Run: docker run -p 8008:8008 -v parley-data:/data parley:dev
# Settings come from PARLEY__* environment variables (see server/parleyd.example.toml).

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The caches speed up rebuilds; the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p parley-server --bin parleyd --locked \
    && cp target/release/parleyd /usr/local/bin/parleyd

# The S3-compatible store of docker-compose.cluster.yml: s3s-fs from crates.io, the server the
# tests use (`docker build --target s3 -t parley-s3:dev .`; compose builds it).
FROM rust:1.95-bookworm AS s3s-fs
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo install s3s-fs --version 0.14.1 --features binary --locked --root /opt/s3s-fs

FROM debian:bookworm-slim AS s3
COPY --from=s3s-fs /opt/s3s-fs/bin/s3s-fs /usr/local/bin/s3s-fs
EXPOSE 9000
ENTRYPOINT ["s3s-fs"]

# The parleyd image (the default target: the last stage).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 parley \
    && useradd --system --uid 10001 --gid parley --home-dir /data --no-create-home --shell /usr/sbin/nologin parley \
    && mkdir -p /data /certs \
    && chown parley:parley /data /certs
COPY --from=builder /usr/local/bin/parleyd /usr/local/bin/parleyd
USER parley
WORKDIR /data
# Inside a container the client API must listen on all interfaces to be reachable.
ENV PARLEY__DATA_DIR=/data \
    PARLEY__LISTEN=0.0.0.0:8008
VOLUME ["/data"]
# 8008: client API (HTTP, WebSocket). 8448: federation (HTTPS), when enabled.
EXPOSE 8008 8448
ENTRYPOINT ["parleyd"]
CMD ["serve"]
