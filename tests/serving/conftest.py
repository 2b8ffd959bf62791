"""Serving tests: run in the serve venv (vLLM installed); skipped with a reason elsewhere."""
from __future__ import annotations

import importlib.util
import os
import sys

if importlib.util.find_spec("vllm") is not None:  # the serve venv only: the main suite is untouched
    # vLLM must not see the Triton interpreter switch that tests/conftest.py sets for the kernel tests
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
