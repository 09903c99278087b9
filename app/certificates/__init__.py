"""Signed certificates of completed deletion requests, and the key that signs them."""
