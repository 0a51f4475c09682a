import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Machines without internet cannot download tiktoken's GPT-2 files; CI and developers have a ready
# cache beside the checkout. Tests only: the project itself never reads ../shared.
_cache = os.path.join(ROOT, "..", "shared", "tiktoken")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_cache)

# Under pytest -n, the workers share the cores: one thread each, or their thread pools fight
if "PYTEST_XDIST_WORKER" in os.environ:
    import torch
    torch.set_num_threads(1)
