# The gateway in a container.
#
#   docker build -t jvpn .
#   docker run --cap-add NET_ADMIN --device /dev/net/tun \
#       -p 51820:51820/udp -p 443:443/udp -p 443:443/tcp \
#       -v /etc/jvpn:/etc/jvpn:ro jvpn
#
# /etc/jvpn/gateway.toml as in config/gateway.toml; set `metrics.listen` to
# "0.0.0.0:9477" (and publish it) for Prometheus outside the container, and
# `forwarding.enable = true` (with --sysctl net.ipv4.ip_forward=1 if the runtime refuses
# the write) for clients to reach the networks behind the gateway.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin jvpn

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/jvpn /usr/local/bin/jvpn
COPY config/ /usr/share/jvpn/examples/
EXPOSE 51820/udp 443/udp 443/tcp 9477/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["jvpn"]
CMD ["gateway", "--config", "/etc/jvpn/gateway.toml"]
