"""The run's compile caches of its vLLM servers: one per model and command line, warmed by the first
server that starts cold, copied by every later one (``CompileCache``)."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
from pathlib import Path

log = logging.getLogger("selftrain")

# The folders a server compiles into (its environment points each at the server's own copy).
CACHE_FOLDERS = ("vllm", "torchinductor", "triton")


class CompileCache:
    """The run's compile cache of one model served with one command line: warmed by the first server
    that starts cold, copied by every later one.

    Servers never share a cache folder: caches that several servers write at once on a shared
    filesystem get corrupted (the field's reports). A server starts from a private copy of the
    published cache; the first cold start to finish publishes its own folders by copying them aside
    and renaming the copy into place. The rename is atomic, so a reader sees the whole cache or none,
    and of cold starts finishing together one wins and the others drop their copy. vLLM checks
    what it loads against its own hashes (model, versions, source), so a stale entry is recompiled,
    not trusted.
    """

    def __init__(self, root: Path, argv: list[str]):
        key = hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:16]
        self.root, self.published = root, root / key

    def warm(self, private: Path) -> bool:
        """Copy the published cache into a server's own folder; False if none is published yet."""
        if not self.published.is_dir():
            return False
        shutil.copytree(self.published, private, dirs_exist_ok=True)
        return True

    def publish(self, private: Path) -> None:
        if self.published.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        aside = self.root / f".{self.published.name}.{secrets.token_hex(4)}"
        for name in CACHE_FOLDERS:
            if (private / name).is_dir():
                shutil.copytree(private / name, aside / name)
        try:
            aside.rename(self.published)
            log.info("published the compile cache for later servers of this model: %s", self.published)
        except OSError:  # another server published first
            shutil.rmtree(aside, ignore_errors=True)
