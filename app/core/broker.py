"""What the broker holds: messages waiting per queue (the metrics and the resume sweep,
which re-sends lost work only while a queue is empty)."""

from __future__ import annotations

from sqlalchemy import text

QUEUES = ("gpu", "default", "webhooks")


def queue_depth(broker_url: str) -> dict[str, int]:
    """Messages waiting per queue, for the Redis and the SQLAlchemy brokers."""
    depth: dict[str, int] = {}
    if broker_url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        for q in QUEUES:
            depth[q] = int(client.llen(q))  # type: ignore[arg-type]
    elif broker_url.startswith("sqla+"):
        from sqlalchemy import create_engine

        engine = create_engine(broker_url.removeprefix("sqla+"))
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT q.name, count(m.id) FROM kombu_queue q LEFT JOIN kombu_message m"
                        " ON m.queue_id = q.id AND m.visible GROUP BY q.name"
                    )
                )
                depth = {str(name): int(n) for name, n in rows}
        finally:
            engine.dispose()
    return depth
