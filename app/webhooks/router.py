"""Webhook endpoints (admin only)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from app.api.deps import AdminDep, SessionDep
from app.webhooks import service
from app.webhooks.schemas import (
    DeliveryList,
    DeliveryOut,
    WebhookCreated,
    WebhookIn,
    WebhookList,
    WebhookOut,
    WebhookSecret,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.post("", status_code=201, responses={422: {}})
def create_webhook(body: WebhookIn, caller: AdminDep, session: SessionDep) -> WebhookCreated:
    ep = service.create_endpoint(session, body, caller.actor)
    return WebhookCreated(id=ep.id, url=ep.url, events=list(ep.events), secret=ep.secret)


@router.get("")
def list_webhooks(_: AdminDep, session: SessionDep) -> WebhookList:
    return WebhookList(items=service.list_endpoints(session))


@router.get("/{webhook_id}/deliveries", responses={404: {}})
def list_deliveries(
    webhook_id: str,
    _: AdminDep,
    session: SessionDep,
    status: Annotated[
        Literal["pending", "delivered", "failed", "cancelled"] | None, Query()
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> DeliveryList:
    return DeliveryList(items=service.list_deliveries(session, webhook_id, status, limit))


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver",
    status_code=202,
    responses={404: {}, 409: {}},
)
def redeliver(
    webhook_id: str, delivery_id: str, caller: AdminDep, session: SessionDep
) -> DeliveryOut:
    return service.redeliver(session, webhook_id, delivery_id, caller.actor)


@router.post("/{webhook_id}/rotate-secret", responses={404: {}})
def rotate_secret(webhook_id: str, caller: AdminDep, session: SessionDep) -> WebhookSecret:
    """The old secret stops signing as soon as this returns: every later attempt, retries
    of older messages included, is signed with the new one."""
    ep = service.rotate_secret(session, webhook_id, caller.actor)
    return WebhookSecret(id=ep.id, secret=ep.secret)


@router.post("/{webhook_id}/enable", responses={404: {}, 409: {}})
def enable_webhook(webhook_id: str, caller: AdminDep, session: SessionDep) -> WebhookOut:
    """Beyond API.md: turn an endpoint disabled by a 410 back on."""
    return service.endpoint_out(service.enable_endpoint(session, webhook_id, caller.actor))


@router.delete("/{webhook_id}", status_code=204, responses={404: {}})
def delete_webhook(webhook_id: str, caller: AdminDep, session: SessionDep) -> Response:
    service.delete_endpoint(session, webhook_id, caller.actor)
    return Response(status_code=204)
