# The edge: official Caddy with the repository's Caddyfile baked in.
#   docker build -f images/caddy.Dockerfile -t neuronetz-gateway-caddy .
# Certificates live in /data: mount a volume there (compose.prod.yml does).
ARG CADDY_IMAGE=caddy:2.11-alpine
FROM ${CADDY_IMAGE}
COPY caddy/Caddyfile /etc/caddy/Caddyfile
RUN caddy validate --adapter caddyfile --config /etc/caddy/Caddyfile
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:2019/config/"]
