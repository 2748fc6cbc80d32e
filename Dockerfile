# syntax=docker/dockerfile:1
# Multi-stage build of the `mindroom-billing` server.
#   docker build -t mindroom-billing .
#   docker run -p 3005:3005 -v billing-data:/data --env-file .env mindroom-billing   # serve (SQLite in /data)
#   docker run --env-file .env mindroom-billing migrate                   # apply SQL migrations

FROM rust:1.95-bookworm AS build
WORKDIR /src
# 1. Dependency layer: build the workspace with stub sources so dependencies are cached.
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY mindroom-billing-core/Cargo.toml mindroom-billing-core/
COPY mindroom-billing-hyper/Cargo.toml mindroom-billing-hyper/
COPY mindroom-billing-supabase/Cargo.toml mindroom-billing-supabase/
COPY mindroom-billing-sqlite/Cargo.toml mindroom-billing-sqlite/
COPY mindroom-billing-dokku/Cargo.toml mindroom-billing-dokku/
COPY mindroom-billing-resend/Cargo.toml mindroom-billing-resend/
COPY examples/Cargo.toml examples/
COPY benches/Cargo.toml benches/
RUN for c in mindroom-billing-core mindroom-billing-hyper mindroom-billing-supabase mindroom-billing-sqlite mindroom-billing-dokku \
        mindroom-billing-resend benches; do mkdir -p $c/src && echo "" > $c/src/lib.rs; done \
    && mkdir -p examples/src && echo "fn main() {}" > examples/src/main.rs \
    && touch mindroom-billing-core/README.md \
    && cargo build --release --locked -p mindroom-billing-examples || true
# 2. The real sources.
COPY . .
RUN touch mindroom-billing-*/src/lib.rs examples/src/main.rs \
    && cargo build --release --locked --bin mindroom-billing

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home billing \
    && mkdir /data && chown 10001:10001 /data
COPY --from=build /src/target/release/mindroom-billing /usr/local/bin/mindroom-billing
# Without DATABASE_URL the store is the SQLite file ./data/mindroom-billing.db: /data from here.
WORKDIR /
VOLUME /data
USER 10001
ENV PORT=3005 LOG_FORMAT=json
EXPOSE 3005
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
ENTRYPOINT ["mindroom-billing"]
CMD ["serve"]
