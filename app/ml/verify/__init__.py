"""Verification of unlearning candidates: membership inference, feature injection, fairness.

Pure engine code (tensors and numpy in, dataclasses out); the service turns the results
into reports and decisions.
"""
