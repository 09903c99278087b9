"""`/v1/deletion-requests`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from app.api.deps import (
    AdminDep,
    AnyRoleDep,
    AsyncSettingsDep,
    IntakeCallerDep,
    PortalDep,
    SessionDep,
    SettingsDep,
)
from app.certificates import service as certificates
from app.certificates.schemas import SignedCertificate
from app.requests import intake, service, states
from app.requests.schemas import (
    DeletionRequestIn,
    DeletionRequestOut,
    ExtendIn,
    RequestAccepted,
    RequestPage,
    ReviewIn,
)

router = APIRouter(prefix="/v1/deletion-requests", tags=["deletion requests"])
STATUSES = "|".join(states.STATUSES)


@router.post("", status_code=202, responses={200: {}, 403: {}, 404: {}, 409: {}, 422: {}})
async def create_request(
    body: DeletionRequestIn,
    caller: IntakeCallerDep,
    settings: AsyncSettingsDep,
    response: Response,
    # The length rule is stated here and enforced by the service (a 400).
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", json_schema_extra={"minLength": 1, "maxLength": 200}),
    ] = None,
    # A platform's callback (Fides): an http(s) URL of a public host, with its token;
    # the service checks both (422 `callback_url_refused` names why).
    reply_to: Annotated[
        str | None,
        Header(
            alias="Reply-To",
            max_length=2000,
            description="http(s) URL of a public host (with Reply-To-Token)",
        ),
    ] = None,
    reply_to_token: Annotated[str | None, Header(alias="Reply-To-Token")] = None,
) -> RequestAccepted:
    """`Reply-To` and `Reply-To-Token` (Fides's asynchronous callback): Palimpsest calls
    that URL with that token when the request completes; see docs/fides.md. Requests
    are stored in groups (app/requests/intake.py); a 202 means this one is stored."""
    accepted, created = await intake.accept(
        body, caller, settings, idempotency_key, reply_to, reply_to_token
    )
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return accepted


@router.get("", responses={400: {}})
def list_requests(
    caller: AnyRoleDep,
    session: SessionDep,
    status: Annotated[str | None, Query(pattern=f"^({STATUSES})$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> RequestPage:
    return service.list_page(session, caller, status, limit, cursor)


@router.get("/{request_id}", responses={404: {}})
def get_request(request_id: str, caller: AnyRoleDep, session: SessionDep) -> DeletionRequestOut:
    return service.to_out(session, service.get(session, request_id, caller), caller)


@router.post("/{request_id}/cancel", responses={404: {}, 409: {}})
def cancel_request(request_id: str, caller: PortalDep, session: SessionDep) -> DeletionRequestOut:
    req = service.get(session, request_id, caller)
    service.cancel(session, req, caller)
    return service.to_out(session, req, caller)


@router.post("/{request_id}/extend", responses={404: {}, 409: {}, 422: {}})
def extend_request(
    request_id: str, body: ExtendIn, caller: AdminDep, session: SessionDep, settings: SettingsDep
) -> DeletionRequestOut:
    req = service.get(session, request_id, caller)
    service.extend(session, req, caller, body.reason, body.days, settings)
    return service.to_out(session, req, caller)


@router.post("/{request_id}/retry", responses={404: {}, 409: {}})
def retry_request(request_id: str, caller: AdminDep, session: SessionDep) -> DeletionRequestOut:
    """Beyond API.md: retry a failed request (its failed models retrain from scratch)."""
    req = service.get(session, request_id, caller)
    service.retry(session, req, caller)
    return service.to_out(session, req, caller)


@router.post("/{request_id}/review", responses={404: {}, 409: {}, 422: {}})
def review_request(
    request_id: str, body: ReviewIn, caller: AdminDep, session: SessionDep
) -> DeletionRequestOut:
    """Settle a request in `needs_review`: approve, reject (retrain) or mitigate."""
    req = service.get(session, request_id, caller)
    service.review(session, req, caller, body.action, body.note, mitigation=body.mitigation)
    return service.to_out(session, req, caller)


@router.get("/{request_id}/certificate", responses={404: {}})
def get_certificate(request_id: str, caller: AnyRoleDep, session: SessionDep) -> SignedCertificate:
    """The signed certificate; 404 `certificate_not_available` until the request completes."""
    req = service.get(session, request_id, caller)
    return SignedCertificate.model_validate(certificates.get_signed(session, req))
