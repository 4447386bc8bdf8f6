# One image for the gateway and the shard workers; docker-compose.yml picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 BLOOMDUO_LOG_FORMAT=json BLOOMDUO_CACHE=/cache
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY proto proto
COPY bloomduo bloomduo
COPY gateway gateway
COPY shard_worker shard_worker
COPY client client
RUN pip install --no-cache-dir -c constraints.txt torch && pip install --no-cache-dir -c constraints.txt .
USER 65534:65534
ENTRYPOINT ["bloomduo"]
