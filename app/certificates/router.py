"""`/v1/signing-key`: the public half of the key that signs certificates. Public on
purpose: anyone handed a certificate must be able to check it."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SettingsDep
from app.certificates import service
from app.certificates.schemas import SigningKeyOut

router = APIRouter(prefix="/v1", tags=["certificates"])


@router.get("/signing-key")
def signing_key(settings: SettingsDep) -> SigningKeyOut:
    return SigningKeyOut.model_validate(service.public_key_info(settings))
