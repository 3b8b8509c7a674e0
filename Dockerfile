# distributed-cache image. Base images are build arguments with the usual public defaults, so
# the same file builds anywhere; tests/docker/compose_test.sh builds it from locally made bases.
#
#   docker build -t distributed-cache .                         # compiles in the build stage
#   docker build --target runtime-prebuilt -t distributed-cache .   # takes target/release/distributed-cache
#
# Stage order matters: runtime-prebuilt comes before the build stage so that building it never
# needs the Rust image, even with Docker's legacy (non-BuildKit) builder.
ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUNTIME_IMAGE} AS runtime-base
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin cache
# The node binds 0.0.0.0:8080; ADDR (its identity, what peers dial) defaults to the container's
# hostname. Every other variable is the binary's own (see the README).
ENV LISTEN_ADDR=0.0.0.0:8080 \
    LOG_FORMAT=json
EXPOSE 8080/tcp 8080/udp
USER cache
# The binary is its own health probe (grpc.health.v1 over gRPC), so the image needs no extra tool.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/distributed-cache", "health", "--addr", "127.0.0.1:8080", "--timeout", "2"]
ENTRYPOINT ["/usr/local/bin/distributed-cache"]

FROM runtime-base AS runtime-prebuilt
COPY target/release/distributed-cache /usr/local/bin/distributed-cache

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin distributed-cache \
    && cp target/release/distributed-cache /distributed-cache

FROM runtime-base AS runtime
COPY --from=build /distributed-cache /usr/local/bin/distributed-cache
