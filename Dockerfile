# rabbit-sidecar image; also carries the demo app and producer used by docker-compose.yml.
#
#   docker build -t rabbit-sidecar .
#
# The build context is an allowlist (.dockerignore): add new top-level inputs (build.rs, ...) there.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
# Cargo.toml names the benchmark's path; cargo wants it present even when not building it.
COPY benches ./benches
RUN cargo build --release --locked --bin rabbit-sidecar --examples

FROM debian:bookworm-slim
# ca-certificates for amqps:// and OTLP over TLS; nothing else (no curl: the healthcheck is
# the binary's own subcommand).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin rabbit-sidecar
COPY --from=builder /src/target/release/rabbit-sidecar /usr/local/bin/rabbit-sidecar
COPY --from=builder /src/target/release/examples/demo_app /usr/local/bin/demo_app
COPY --from=builder /src/target/release/examples/demo_producer /usr/local/bin/demo_producer
USER 10001:10001
EXPOSE 9102
# Liveness only: /healthz fails when the process is wedged, never for a broker or app outage.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 CMD ["rabbit-sidecar", "healthcheck"]
ENTRYPOINT ["rabbit-sidecar"]
