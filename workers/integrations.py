"""Tasks for platform callbacks (Fides): one attempt per task, and the beat's sweep."""

from __future__ import annotations

from celery import shared_task


@shared_task(name="palimpsest.deliver_integration_callback", acks_late=True)
def deliver_integration_callback(callback_id: str) -> str:
    """One attempt; the retry is scheduled by the delivery itself, so a failing platform
    never fails the task."""
    from app.integrations import delivery

    return delivery.deliver(callback_id)


@shared_task(name="palimpsest.sweep_integration_callbacks")
def sweep_integration_callbacks() -> int:
    """Beat: re-send callbacks whose attempt is overdue (a lost task)."""
    from app.integrations import delivery

    return delivery.sweep()


@shared_task(name="palimpsest.sync_registry_mirror", acks_late=True)
def sync_registry_mirror(model_id: str) -> str:
    """One reconciliation of a model's MLflow mirror; a failure schedules its own retry
    (app.integrations.mlflow_mirror), so MLflow being down never fails the task."""
    from app.integrations import mlflow_mirror

    return mlflow_mirror.sync(model_id)


@shared_task(name="palimpsest.sweep_registry_mirrors")
def sweep_registry_mirrors() -> int:
    """Beat: send the mirror syncs that are due (retries, lost tasks)."""
    from app.integrations import mlflow_mirror

    return mlflow_mirror.sweep()
