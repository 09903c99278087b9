"""ORM models. Importing this package registers every table on `Base.metadata`."""

from app.models.base import Base
from app.models.catalog import Dataset, Record, Source, Subject
from app.models.certificates import Certificate
from app.models.integrations import RequestCallback
from app.models.mirrors import RegistryMirror
from app.models.ops import ApiKey, AuditEvent, Job, Report
from app.models.registry import Lineage, MLModel, ModelVersion
from app.models.requests import DeletionRequest, RequestModel
from app.models.webhooks import WebhookDelivery, WebhookEndpoint, WebhookEvent

__all__ = [
    "ApiKey",
    "AuditEvent",
    "Base",
    "Certificate",
    "Dataset",
    "DeletionRequest",
    "Job",
    "Lineage",
    "MLModel",
    "ModelVersion",
    "Record",
    "RegistryMirror",
    "Report",
    "RequestCallback",
    "RequestModel",
    "Source",
    "Subject",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEvent",
]
