"""A FUSE passthrough filesystem that behaves like the shared filesystems of clusters, for tests and benches.

    python -m tools.bench.loopfs BACKING MOUNTPOINT [--delay-ms 5] [--refuse-flock] [--log OPS_FILE]

It shows folder BACKING at MOUNTPOINT (in the foreground, until unmounted) and can

- ``--refuse-flock``: answer every flock with ENOLCK, as Lustre mounted without ``-o flock`` or an
  NFS mount without a lock manager do;
- ``--delay-ms N``: wait N ms in every operation but reads and writes of file data (lookups,
  open, create, close, rename, unlink, listing, fsync, ...), as a network filesystem whose server is
  N ms away;
- ``--log FILE``: append one line per operation that changes or syncs something (``create PATH``,
  ``fsync PATH``, ``rename OLD NEW``, ``fsyncdir PATH``), so that a test can check their order.

The kernel caches lookups and attributes for 1 s (libfuse's defaults), as NFS does for a few. A
listing carries every entry's attributes (READDIRPLUS, as NFS clients read folders), so that the
files just listed are opened without a lookup each. Lookups of files not listed before wait on each
other within a folder, which no NFS or Lustre client does: libfuse 3.14 (Debian 12's) never passes
FUSE_PARALLEL_DIROPS to the kernel (libfuse#861, fixed in later releases).
``mounted()`` runs it for a ``with`` block. Needs root (or fusermount3), /dev/fuse, libfuse3
(Debian: libfuse3-3) and mfusepy.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# libfuse 3's flags (fuse_common.h, fuse.h): the kernel asks for READDIRPLUS only in a folder's first
# listing unless READDIRPLUS_AUTO is off; a readdir asked for PLUS answers with FILL_DIR_PLUS entries.
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_READDIR_PLUS = 1
FUSE_FILL_DIR_PLUS = 2
STAT_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime", "st_ctime")


def serve(backing: str, mountpoint: str, delay_s: float, refuse_flock: bool, log_path: str | None) -> None:
    import mfusepy

    log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 (open for the life of the mount)
    log_lock = threading.Lock()
    handles = itertools.count(1)
    listings: dict[int, list[tuple[str, dict[str, Any], int]]] = {}

    def real(path: str) -> str:
        return os.path.join(backing, path.lstrip("/"))

    def wait() -> None:
        if delay_s:
            time.sleep(delay_s)

    def note(*words: str) -> None:
        if log is not None:
            with log_lock:
                log.write(" ".join(words) + "\n")

    class LoopFS(mfusepy.Operations):
        use_ns = True

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            wait()
            return stat_dict(os.fstat(fh) if fh is not None else os.lstat(real(path)))

        def access(self, path: str, amode: int) -> int:
            wait()
            if not os.access(real(path), amode):
                raise mfusepy.FuseOSError(errno.EACCES)
            return 0

        def init_with_config(self, conn: Any, config: Any) -> None:
            if conn is not None:  # every listing with attributes, not a folder's first chunk alone
                conn.want &= ~FUSE_CAP_READDIRPLUS_AUTO

        def opendir(self, path: str) -> int:
            wait()
            return next(handles)

        def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, Any], int]]:
            """The folder's entries with their attributes, read once per opening of the folder; every
            call (a chunk of the listing) waits as a request to a server does."""
            wait()
            if fh not in listings:
                folder = real(path)
                entries = [(".", stat_dict(os.lstat(folder)), 0), ("..", stat_dict(os.lstat(os.path.dirname(folder))), 0)]
                with os.scandir(folder) as found:
                    entries += [(entry.name, stat_dict(entry.stat(follow_symlinks=False)), 0) for entry in found]
                listings[fh] = entries
            return listings[fh]

        def releasedir(self, path: str, fh: int) -> int:
            wait()
            listings.pop(fh, None)
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            wait()
            fd = os.open(real(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            note("fsyncdir", path)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            wait()
            os.mkdir(real(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            wait()
            os.rmdir(real(path))
            return 0

        def unlink(self, path: str) -> int:
            wait()
            os.unlink(real(path))
            note("unlink", path)
            return 0

        def rename(self, old: str, new: str) -> int:
            wait()
            os.rename(real(old), real(new))
            note("rename", old, new)
            return 0

        def link(self, target: str, source: str) -> int:
            wait()
            os.link(real(source), real(target))
            return 0

        def symlink(self, target: str, source: str) -> int:
            wait()
            os.symlink(source, real(target))
            return 0

        def readlink(self, path: str) -> str:
            wait()
            return os.readlink(real(path))

        def chmod(self, path: str, mode: int) -> int:
            wait()
            os.chmod(real(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            wait()
            os.chown(real(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            wait()
            os.utime(real(path), ns=times)
            return 0

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            wait()
            if fh is None:
                os.truncate(real(path), length)
            else:
                os.ftruncate(fh, length)
            return 0

        def statfs(self, path: str) -> dict[str, Any]:
            wait()
            st = os.statvfs(real(path))
            return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

        def open(self, path: str, flags: int) -> int:
            wait()
            return os.open(real(path), flags)

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            wait()
            note("create", path)
            return os.open(real(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return os.pwrite(fh, data, offset)

        def flush(self, path: str, fh: int) -> int:
            wait()
            return 0

        def release(self, path: str, fh: int) -> int:
            wait()
            os.close(fh)
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            wait()
            os.fsync(fh)
            note("fsync", path)
            return 0

        if refuse_flock:

            def flock(self, path: str, fh: int, op: int) -> int:
                raise mfusepy.FuseOSError(errno.ENOLCK)

    class PlusFUSE(mfusepy.FUSE):
        """mfusepy's FUSE, answering READDIRPLUS with each entry's attributes (mfusepy passes on the
        mode alone, which gives the kernel no entry to keep)."""

        def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
            if not flags & FUSE_READDIR_PLUS:
                return super().readdir_fuse_3(path, buf, filler, offset, fip, flags)
            # With offsets: libfuse passes a listing given all at once (offset 0) to the kernel
            # without its entries' attributes.
            if offset == 0:  # the folder read anew: a first listing, or a rewind
                listings.pop(fip.contents.fh, None)
            entries = self.operations.readdir((path or b"/").decode(), fip.contents.fh)
            st = mfusepy.c_stat()
            for index in range(offset, len(entries)):
                name, attrs, _ = entries[index]
                ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
                mfusepy.set_st_attrs(st, attrs, use_ns=True)
                if filler(buf, name.encode(), st, index + 1, FUSE_FILL_DIR_PLUS) != 0:
                    break  # the kernel's buffer is full: it asks again from this offset
            return 0

    # Many threads, as many requests in flight as a network filesystem client would have.
    PlusFUSE(LoopFS(), mountpoint, foreground=True, allow_other=True, max_threads=64)


def stat_dict(st: os.stat_result) -> dict[str, Any]:
    attrs = {k: getattr(st, k) for k in STAT_FIELDS}
    attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
    return attrs


def fuse_unavailable() -> str | None:
    """Why a loopfs cannot be mounted here, or None."""
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as error:  # OSError: mfusepy found no libfuse
        return f"mfusepy: {error}"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "no /dev/fuse"
    return None


@contextlib.contextmanager
def mounted(backing: Path, mountpoint: Path, delay_ms: float = 0, refuse_flock: bool = False, log: Path | None = None) -> Iterator[Path]:
    """``backing`` seen through a loopfs at ``mountpoint`` for the block; RuntimeError if it does not mount."""
    backing.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tools.bench.loopfs", str(backing), str(mountpoint), "--delay-ms", str(delay_ms)]
    command += ["--refuse-flock"] * refuse_flock + (["--log", str(log)] if log else [])
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mountpoint):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                lines = (server.communicate()[1] or "").strip().splitlines()
                raise RuntimeError(f"loopfs did not mount at {mountpoint}: {lines[-1] if lines else 'no message'}")
            time.sleep(0.05)
        yield mountpoint
    finally:
        if server.poll() is None:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.loopfs", description=__doc__.splitlines()[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--refuse-flock", action="store_true")
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    serve(os.path.abspath(args.backing), args.mountpoint, args.delay_ms / 1000, args.refuse_flock, args.log)
    return 0


def drop_page_cache() -> bool:
    """Write back and drop the page cache, so that what is read next comes from the disk (root only)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
