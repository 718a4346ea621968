# syntax=docker/dockerfile:1
# One image for every Keel role; the role is the command: `keel registry`, `keel gateway`, …
# Built by docker-compose.yml as keel:latest.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
# rdkafka builds its bundled librdkafka with make and a C compiler; the etcd client compiles
# etcd's protos with protoc.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# sqlx's query macros must not need a database while the image builds.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release -p keel --locked \
    && install -D -m 0755 target/release/keel /out/keel

FROM debian:bookworm-slim
# curl serves the compose healthchecks (GET /readyz).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home keel
WORKDIR /app
COPY --from=builder /out/keel /usr/local/bin/keel
COPY migrations ./migrations
COPY topics/schemas ./topics/schemas
USER keel
ENV KEEL_LOG__FORMAT=json
STOPSIGNAL SIGTERM
ENTRYPOINT ["keel"]
CMD ["--help"]
