# Tollgate gateway image: slim Python, non-root, health-checked.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /srv/tollgate --create-home tollgate
COPY --from=build /install /usr/local
WORKDIR /srv/tollgate
# The example config with its demo key and policies: mount your own /etc/tollgate in production.
COPY --chown=tollgate:tollgate config.example.yaml /etc/tollgate/config.yaml
COPY --chown=tollgate:tollgate keys.example.yaml /etc/tollgate/keys.example.yaml
COPY --chown=tollgate:tollgate policies /etc/tollgate/policies
USER tollgate
EXPOSE 8080 9090
# /healthz answers on the proxy port without touching the upstream.
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD python -c "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["gateway", "run", "--config", "/etc/tollgate/config.yaml"]
CMD ["--host", "0.0.0.0"]
