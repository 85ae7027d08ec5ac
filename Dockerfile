# pgnotify-worker: the dependencies from the committed lock (pinned, hash-checked) and the project's
# wheel go into a venv in the build stage; the runtime copies that venv into a slim image with no
# pip, setuptools, wheel or compiler, running as a fixed non-root uid.
# Build: docker build -t pgnotify-worker .   Run: docker run -e PGNOTIFY_DATABASE_URL=... pgnotify-worker
# The lock: requirements/image.lock (`make lock` refreshes it from pyproject.toml).

ARG VERSION=0.1.0

FROM python:3.11.10-slim-bookworm AS build
ARG VERSION
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
# The venv has no pip of its own: the stage's pip installs into it (--python).
COPY requirements/image.lock ./requirements/image.lock
RUN python -m venv --without-pip /opt/venv \
 && pip --python /opt/venv/bin/python install --no-cache-dir --no-deps --require-hashes \
      --only-binary=:all: -r requirements/image.lock
COPY pyproject.toml README.md CHANGELOG.md LICENSE ./
COPY schema ./schema
COPY src ./src
RUN python -m build --wheel --outdir /dist \
 && pip --python /opt/venv/bin/python install --no-cache-dir --no-deps \
      "/dist/pgnotify_worker-${VERSION}-py3-none-any.whl" \
 && pip --python /opt/venv/bin/python check

FROM python:3.11.10-slim-bookworm AS runtime
ARG VERSION
ENV PATH=/opt/venv/bin:/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PGNOTIFY_HTTP_HOST=0.0.0.0 \
    PGNOTIFY_HTTP_PORT=9090 \
    PGNOTIFY_LOG_FORMAT=json
# The base image's own pip, setuptools and wheel (and ensurepip's copies of them) go: nothing in
# the image installs packages at run time.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
 && rm -rf /usr/local/lib/python3.11/ensurepip \
 && groupadd --system --gid 10001 pgnotify \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin pgnotify
COPY --from=build /opt/venv /opt/venv
COPY LICENSE /usr/share/doc/pgnotify-worker/LICENSE
USER 10001:10001
WORKDIR /tmp
EXPOSE 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgnotify-worker"]
CMD ["run"]
