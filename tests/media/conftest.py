"""The media tests share one service per module (`env`) and a key per role (`keys`)."""

from tests.support.module_env import env

__all__ = ["env"]
