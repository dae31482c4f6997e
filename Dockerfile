# The gateway in a container.
#
#   docker build -t jvpn .
#   docker run --cap-drop ALL --cap-add NET_ADMIN --device /dev/net/tun \
#       --sysctl net.ipv4.ip_forward=1 \
#       -p 51820:51820/udp -p 443:443/udp -p 443:443/tcp \
#       -v /etc/jvpn:/etc/jvpn:ro jvpn
#
# /etc/jvpn/gateway.toml as in config/gateway.toml (readable by uid 10001); set
# `metrics.listen` to "0.0.0.0:9477" (and publish it) for Prometheus outside the
# container. deploy/compose.yml runs it with Prometheus and Grafana.
#
# The contract (checked without docker by the end-to-end test
# `the_container_entrypoint_runs_unprivileged_and_stops_cleanly`): the gateway runs as
# uid 10001 with CAP_NET_ADMIN and no other capability (a file capability on the binary:
# a container without NET_ADMIN cannot start it at all — the kernel refuses to run a
# binary whose capability is not in the bounding set — so even `jvpn keygen` in the
# image needs `--cap-add NET_ADMIN`); the health check asks the admin socket; `docker stop` (SIGTERM) ends every session explicitly (operator_terminated,
# the clients are told) and the process exits 0.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# As the README builds it.
RUN cargo build --release --locked --bin jvpn

FROM debian:bookworm-slim
# nftables: only for `forwarding.masquerade_out`; libcap2-bin: to set the capability.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables libcap2-bin \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/jvpn /usr/local/bin/jvpn
COPY config/ /usr/share/jvpn/examples/
RUN setcap cap_net_admin=ep /usr/local/bin/jvpn \
    && groupadd --system --gid 10001 jvpn \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin jvpn \
    && install -d -o 10001 -g 10001 -m 0750 /run/jvpn
USER 10001:10001
EXPOSE 51820/udp 443/udp 443/tcp 9477/tcp
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["jvpn", "status", "--socket", "/run/jvpn/gateway.sock"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["jvpn"]
CMD ["gateway", "--config", "/etc/jvpn/gateway.toml"]
