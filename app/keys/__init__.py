"""API keys: creation, listing, revocation (`service`), and `/v1/keys` (`router`)."""

from app.keys.service import create_key, find_key, list_keys, revoke_key

__all__ = ["create_key", "find_key", "list_keys", "revoke_key"]
