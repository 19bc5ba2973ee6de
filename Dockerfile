# keyq's image: one image for every keyq service (worker, beat, migrate, Flower).
# Stage 1 builds wheels of keyq and all its dependencies (with the `ops` extra: Flower);
# stage 2 installs only those wheels, without a compiler or pip cache, and runs as a non-root
# user. The health check is `keyq health` (Redis, broker, database; workers add --node %h in
# docker-compose.yml so their own heartbeat is checked too).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY keyq ./keyq
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels ".[ops]"

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin keyq
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links=/wheels "keyq[ops]" \
    && rm -rf /wheels
WORKDIR /app
COPY celeryconfig.py /app/celeryconfig.py
USER keyq
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["keyq", "health"]
ENTRYPOINT ["keyq"]
CMD ["worker", "--hostname", "%h", "--no-migrate"]
