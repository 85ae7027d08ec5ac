# pgnotify-worker: build the wheel and every dependency wheel, then install them into a slim
# runtime with no compiler, running as a fixed non-root uid.
# Build: docker build -t pgnotify-worker .   Run: docker run -e PGNOTIFY_DATABASE_URL=... pgnotify-worker

ARG VERSION=0.1.0

FROM python:3.11.10-slim-bookworm AS build
ARG VERSION
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY pyproject.toml README.md CHANGELOG.md ./
COPY schema ./schema
COPY src ./src
RUN python -m build --wheel --outdir /dist \
 && pip wheel --no-cache-dir --wheel-dir /wheels "/dist/pgnotify_worker-${VERSION}-py3-none-any.whl[tracing]"

FROM python:3.11.10-slim-bookworm AS runtime
ARG VERSION
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PGNOTIFY_HTTP_HOST=0.0.0.0 \
    PGNOTIFY_HTTP_PORT=9090 \
    PGNOTIFY_LOG_FORMAT=json
RUN groupadd --system --gid 10001 pgnotify \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin pgnotify
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels "pgnotify-worker[tracing]==${VERSION}" \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /tmp
EXPOSE 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgnotify-worker"]
CMD ["run"]
