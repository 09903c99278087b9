"""The unlearning engine: pure PyTorch on tensors and dataclass configs.

Nothing here imports the database, HTTP or Celery; the service layers call in with
arrays and configs and get tensors, states and results back.
"""
