"""The files of runs and of data through `etils.epath`: a workdir or a data file is a local path
or a URL of a file system that epath reaches through fsspec (`gs://bucket/run` with gcsfs
installed, s3:// with s3fs, az://, hf://). Orbax writes checkpoints to the same strings, with
tensorstore's own drivers (gs:// among them).

An object store is not a disk: an object cannot be appended to or renamed in one step, and a
directory is only a prefix of names. So a write here replaces a whole file, atomically (on a
disk through a temporary file and a rename; on an object store an object appears whole when its
upload ends), a log that grows (`Appender`) is rewritten from memory there, and `makedirs`
makes nothing. Paths stay strings in the engine's signatures; `path()` makes an epath.Path.
"""

import csv
import io
import os
import shutil
import time

from etils import epath

URL_SCHEMES = ("gs", "s3", "az", "hf")  # those etils.epath maps to fsspec


def path(p) -> epath.Path:
    """`p` (a string or a path) as an epath.Path; a URL of a file system epath does not reach
    is an error, not a local directory named 'memory:'."""
    text = os.fspath(p)
    scheme, sep, _ = text.partition("://")
    if sep and scheme not in URL_SCHEMES:
        raise ValueError(f"{text!r}: epath reaches {', '.join(s + '://' for s in URL_SCHEMES)} "
                         f"URLs and local paths, not {scheme}://")
    return epath.Path(text)


def is_local(p) -> bool:
    """Whether `p` is a path of this machine's file system rather than a URL."""
    return "://" not in os.fspath(path(p))


def absolute(p) -> str:
    """`p` as an absolute path (orbax wants one); a URL as it is."""
    return os.path.abspath(p) if is_local(p) else os.fspath(path(p))


def exists(p) -> bool:
    return path(p).exists()


def is_dir(p) -> bool:
    return path(p).is_dir()


def listdir(p) -> list[str]:
    """The names in directory `p`."""
    return [child.name for child in path(p).iterdir()]


def makedirs(p):
    """Makes directory `p` and its parents on a local disk. In a bucket there is nothing to
    make (a directory is the prefix of its files' names), and gcsfs or s3fs would create a
    bucket that is missing: a mistyped name would become a new bucket."""
    if is_local(p):
        os.makedirs(p, exist_ok=True)


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def read_text(p) -> str:
    """The UTF-8 text of file `p` (decoded here: fsspec's text mode takes the locale's)."""
    return read_bytes(p).decode("utf-8")


def write_bytes(p, data: bytes):
    """Replaces file `p` with `data` atomically: a reader sees the old file or the new one."""
    if not is_local(p):
        path(p).write_bytes(data)
        return
    directory, name = os.path.split(os.path.abspath(p))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}{_TMP}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TMP = ".tmp"


def is_temporary(name: str, of: str) -> bool:
    """Whether the file `name` is a temporary file of `write_bytes(<directory>/of)`, left by
    a process killed while writing it."""
    return name.startswith(f".{of}.") and name.endswith(_TMP)


def write_text(p, text: str):
    write_bytes(p, text.encode("utf-8"))


def write_from_process_0(p, data: str | bytes):
    """`write_text` or `write_bytes` on process 0 only, so that the hosts of a multi-host run do
    not all write one file of a shared workdir (and race on it)."""
    import jax  # imported here: reading and writing files needs no jax otherwise
    if jax.process_index() == 0:
        write_bytes(p, data.encode("utf-8") if isinstance(data, str) else data)


def write_csv(p, rows: list[dict], fieldnames=None):
    """`rows` as a CSV file with a header (`fieldnames`, else the first row's keys), written by
    process 0."""
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, list(fieldnames or rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_from_process_0(p, table.getvalue())


def remove(p):
    """Removes file `p`, if it exists."""
    path(p).unlink(missing_ok=True)


def move(src, dst):
    """Moves directory `src` to `dst` on the same file system; in a bucket by copying each file,
    then deleting the originals (an object store cannot rename)."""
    if is_local(src):
        shutil.move(src, dst)
        return
    for name in listdir(src):
        if is_dir(path(src) / name):
            move(path(src) / name, path(dst) / name)
        else:
            write_bytes(path(dst) / name, read_bytes(path(src) / name))
    path(src).rmtree(missing_ok=True)


def create_new(p, text: str) -> bool:
    """Writes `text` to a new file `p`; False, writing nothing, if `p` exists. Exclusive on a
    local disk (O_EXCL) and on Google Cloud Storage (gcsfs's mode 'x' uploads on the condition
    that no object has the name); other object stores may only check, then write."""
    if is_local(p):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    if exists(p):
        return False
    import fsspec  # epath's open() has no mode 'x'
    try:
        with fsspec.open(os.fspath(path(p)), "xb") as f:
            f.write(text.encode("utf-8"))
    except FileExistsError:
        return False
    return True


def copy_tree(local_dir: str, dst):
    """Copies the files under the local directory `local_dir` to directory `dst`."""
    for root, _, names in os.walk(local_dir):
        target = path(dst) / os.path.relpath(root, local_dir)
        makedirs(target)
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                write_bytes(target / name, f.read())


class Appender:
    """A file that grows at its end (a log). On a local disk it is appended to in place; on an
    object store, where an object cannot be appended to, it is kept in memory with what the file
    held and rewritten whole by `flush()`, at most every `upload_every_s` seconds, and by
    `close()`: a process killed in between loses what it wrote since the last upload."""

    def __init__(self, p, upload_every_s: float = 0.0):
        self.path, self.upload_every_s = os.fspath(path(p)), upload_every_s
        self.file = open(p, "ab") if is_local(p) else None
        self.data = None if self.file else io.BytesIO()
        if self.data is not None and exists(p):
            self.data.write(read_bytes(p))
        self.uploaded, self.dirty = time.monotonic(), False

    def write(self, data: bytes):
        if self.file:
            self.file.write(data)
        else:
            self.data.write(data)
            self.dirty = True

    def flush(self, force: bool = False):
        if self.file:
            self.file.flush()
        elif self.dirty and (force or time.monotonic() - self.uploaded >= self.upload_every_s):
            write_bytes(self.path, self.data.getvalue())
            self.uploaded, self.dirty = time.monotonic(), False

    def close(self):
        self.flush(force=True)
        if self.file:
            self.file.close()
