"""Webhooks: endpoints, an outbox of signed deliveries, retries (Standard Webhooks)."""
