"""Both ends of a copy on a file system: the sender (walks the sources, makes records) and the
strict receiver (writes what a stream says, and nothing it should not).

Standard library and vmbusify.files.wire only: like wire.py it is also sent to the guest as
source (vmbusify/files/agent.py), where it pushes (receiver) and pulls (sender).

The receiver treats the stream as hostile (a pull's stream comes from the guest):

- every name is relative, made of components that are not empty, ``.`` or ``..`` and hold no
  NUL; each is reached from the destination directory one component at a time with
  ``openat(O_NOFOLLOW | O_DIRECTORY)``: a symlink, whoever made it (the stream itself, a
  moment ago), is never followed; nothing is written outside the destination;
- files are written to a part file beside the target (``.NAME.vmbcp-part``, created
  ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600, or the file's own mode when that lets no one
  else write it) and renamed over the name when complete, so a
  name only ever shows a whole file; the part is removed on failure (kept when the copy was
  lost half-way, for ``--resume``). A directory the copy makes at the top of DST is made
  under its part name instead (mode 0700) and everything below it written at its own name;
  the whole directory is renamed to its name when the stream leaves it, and removed on
  failure: one rename per tree instead of one per file (not with ``resume``, or when that
  name or its part name is already there);
- setuid, setgid and other special bits are dropped unless ``allow_setid`` (a push by root
  with ``-p``); owners are set only with ``chown`` (root asked for ``-p``); the format has
  no device nodes, FIFOs or sockets (a sender skips them with a warning);
- a file's data is exactly the ``size`` its entry announced: a chunk beyond it, or a file
  end before it, is a protocol error naming the file (its part removed), so a sender cannot
  fill the disk past what it announced; an announced size larger than the target's free
  space fails before anything is written (``no-space``; the free space is read once per
  directory and again only when the sizes announced since would pass what it was);
- memory is bounded: one record at a time, a stack of open directories no deeper than
  MAX_DEPTH, at most MAX_WARNINGS warnings of three short texts each. What is not bounded is
  what the operator asked for: a stream of many files or directories fills the disk (or its
  inodes) and stops with ``no-space``, and a stream that never ends runs until interrupted.

With ``fsync`` the receiver flushes each file to disk before renaming it over its name, and
each directory it changed once it leaves it (rsync's ``--fsync``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import hashlib

from vmbusify.files.wire import (
    MAX_DEPTH,
    MAX_NAME,
    UNKNOWN_SIZE,
    Chunk,
    Entry,
    Event,
    FileEnd,
    Kind,
    Note,
    encode_chunk_header,
    encode_entry,
    encode_file_end,
    encode_note,
)

#: Bytes read from a file per C record.
READ_CHUNK = 1 << 20
#: A file up to this size is sent as one piece (its entry, data and end joined): a tree of
#: small files makes a quarter of the pieces, each one passed up through the generators
#: and gathered into writes.
SMALL_FILE = 64 << 10
#: Suffix of a part file (``.NAME.vmbcp-part``).
PART_SUFFIX = b".vmbcp-part"
#: The mode bits a receiver may set: permissions and the sticky bit (not setuid/setgid).
SAFE_BITS = 0o1777
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Warnings a receiver keeps (the sender's W records); more are counted, not kept.
MAX_WARNINGS = 1000
#: Characters of a peer's text kept in a warning or failure.
MAX_TEXT = 1000


class CopyFailed(Exception):
    """The copy (or one entry of it) failed; ``kind`` is one of KINDS, ``str()`` the reason."""

    def __init__(self, kind: str, message: str, path: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path


#: Why a copy fails (the ``kind`` of W and X records, and of CopyFailed).
KINDS = ("not-found", "permission", "no-space", "is-dir", "not-dir", "exists", "unsafe",
         "protocol", "checksum", "resume", "usage", "lost", "io", "unsupported")
_ERRNO_KIND = {errno.ENOENT: "not-found", errno.EACCES: "permission", errno.EPERM: "permission",
               errno.EROFS: "permission", errno.ENOSPC: "no-space", errno.EDQUOT: "no-space",
               errno.EFBIG: "no-space", errno.EISDIR: "is-dir", errno.ENOTDIR: "not-dir",
               errno.EEXIST: "exists", errno.ENOTEMPTY: "is-dir", errno.ELOOP: "unsafe"}


def show(name: bytes | str) -> str:
    """A name for a message (undecodable bytes as surrogates; callers escape for output)."""
    return os.fsdecode(name) if isinstance(name, bytes) else name


def failed(exc: OSError, what: str, path: bytes | str = b"") -> CopyFailed:
    """The CopyFailed for an OSError while doing ``what``."""
    kind = _ERRNO_KIND.get(exc.errno or 0, "io")
    reason = {"no-space": "no space left on the target's file system"}.get(
        kind, exc.strerror or str(exc))
    where = f" {show(path)}" if path else ""
    return CopyFailed(kind, f"{what}{where}: {reason}", show(path))


def sha256(data: bytes = b"") -> hashlib._Hash:
    """A sha256. ``hashlib`` is loaded here, when first needed: ~3 ms of each start (the
    client's and the guest helper's), which a copy without ``--checksum`` never needs."""
    import hashlib

    return hashlib.sha256(data)


def part_name(leaf: bytes) -> bytes:
    """The part file's name for a target named ``leaf`` (kept under NAME_MAX)."""
    if len(leaf) <= 255 - len(PART_SUFFIX) - 1:
        return b"." + leaf + PART_SUFFIX
    return b".vmbcp-" + sha256(leaf).hexdigest()[:32].encode() + b".part"


def check_name(name: bytes) -> list[bytes]:
    """The components of an entry's name, or CopyFailed("unsafe")."""
    parts = name.split(b"/")
    if (not name or len(name) > MAX_NAME or name.startswith(b"/") or b"\0" in name
            or b"" in parts or b"." in parts or b".." in parts or max(map(len, parts)) > 255):
        raise CopyFailed("unsafe", f"refused an unsafe name from the sender: "
                         f"{show(name[:300])!r}", show(name))
    if len(parts) > MAX_DEPTH:
        raise CopyFailed("unsafe", f"refused a name deeper than {MAX_DEPTH} directories from "
                         f"the sender: {show(name[:300])!r}...", show(name))
    return parts


def note_doc(note: Note) -> dict[str, str]:
    """The fields of a peer's W or X record that are kept (``path``, ``kind``, ``message``),
    each cut to MAX_TEXT characters: a peer cannot make a receiver hold more."""
    return {k: str(note.doc.get(k, ""))[:MAX_TEXT] for k in ("path", "kind", "message")}


def over_size(entry: Entry, have: int, more: int) -> CopyFailed | None:
    """The error when ``more`` bytes after ``have`` (counted from the start of the file)
    would go past the size ``entry`` announced; None when they fit."""
    if entry.size == UNKNOWN_SIZE or have + more <= entry.size:
        return None
    return CopyFailed("protocol", f"{show(entry.name)}: the sender sent more than the "
                      f"{entry.size} bytes it announced", show(entry.name))


def short_file(entry: Entry, have: int) -> CopyFailed | None:
    """The error when a file ends after ``have`` bytes of the size it announced."""
    if entry.size in (UNKNOWN_SIZE, have):
        return None
    return CopyFailed("protocol", f"{show(entry.name)}: the file ended after {have} of the "
                      f"{entry.size} bytes the sender announced", show(entry.name))


def free_space(fd: int, root: bool | None = None) -> int:
    """Bytes this user may still write on the file system of the directory ``fd`` (root may
    use the blocks reserved for it; ``root``: whether this process is, if known)."""
    st = os.fstatvfs(fd)
    if root is None:
        root = os.geteuid() == 0
    return (st.f_bfree if root else st.f_bavail) * st.f_frsize


#: What a file's data is counted as against the free space: whole blocks of this size.
BLOCK = 4096


class FreeSpace:
    """The free-space check before each file, without a statvfs for each: the free space
    of a directory's file system is read the first time a file goes into it, and each file
    then takes its announced size (in whole BLOCKs) off what was read; only a file that
    would pass what is left reads it again, and fails if it passes that too. A huge
    announced size still fails before anything is written; the space others take
    meanwhile is what ENOSPC reports (as it was between two reads anyway)."""

    def __init__(self) -> None:
        self._root = os.geteuid() == 0
        #: Directory fd -> bytes still free there by the last read, less what files took.
        self._left: dict[int, int] = {}

    def take(self, dirfd: int, need: int) -> int:
        """Count ``need`` bytes written into ``dirfd``; returns -1 if they fit, else the
        free space there (just read), which they pass."""
        left = self._left.get(dirfd, -1)
        if need > left:
            left = free_space(dirfd, self._root)
            if need > left:
                self._left.pop(dirfd, None)
                return left
        self._left[dirfd] = left - -(-need // BLOCK) * BLOCK
        return -1

    def forget(self, dirfd: int) -> None:
        """``dirfd`` is closed (its number may come back for another directory)."""
        self._left.pop(dirfd, None)


# -- the sender ---------------------------------------------------------------------------------

@dataclass
class Counts:
    """What one end of a copy sent or wrote: entries by type, data bytes, and a warning for
    each entry it could not copy."""

    files: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    warnings: list[dict[str, str]] = field(default_factory=list)


def end_note(counts: Counts) -> bytes:
    """The E record that closes a stream (or a helper's answer) with ``counts``' totals."""
    return encode_note(Kind.END, {"files": counts.files, "dirs": counts.dirs,
                                  "links": counts.links, "bytes": counts.bytes})


class Sender:
    """Makes the records for ``sources`` (paths as bytes). ``pieces()`` yields bytes to send
    in order (a chunk's header and its data as two pieces: no copy).

    ``recursive`` copies directories; without it a directory is a failure. A symlink named
    on the command line is followed without ``recursive`` (as cp does) and copied as a link
    with it; symlinks inside a tree are always copied as links. Device nodes, FIFOs and
    sockets are skipped with a warning. ``names`` gives each source's name in the stream
    (default: its base name).
    """

    def __init__(self, sources: Sequence[bytes], *, recursive: bool = False,
                 checksum: bool = False, offset: int = 0, names: Sequence[bytes] = (),
                 on_file: Callable[[str, int], None] | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.sources = list(sources)
        self.names = list(names) or [os.path.basename(s.rstrip(b"/")) or s for s in sources]
        self.recursive = recursive
        self.checksum = checksum
        self.offset = offset
        self.counts = Counts()
        self.on_file = on_file
        self.on_bytes = on_bytes

    def check(self) -> None:
        """Every source exists and is of a kind this copy takes (CopyFailed otherwise):
        called before anything is sent, so a bad command line copies nothing."""
        for src in self.sources:
            try:
                st = os.stat(src) if not self.recursive else os.lstat(src)
            except OSError as exc:
                raise failed(exc, "cannot read", src) from None
            if stat.S_ISDIR(st.st_mode) and not self.recursive:
                raise CopyFailed("is-dir", f"{show(src)} is a directory (copy it with -r)",
                                 show(src))
            if not stat.S_ISDIR(st.st_mode) and not self.recursive and not os.access(
                    src, os.R_OK):
                raise CopyFailed("permission", f"cannot read {show(src)}: Permission denied",
                                 show(src))

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The whole stream, E record last (or an X record if a source vanished)."""
        for src, name in zip(self.sources, self.names, strict=True):
            try:
                st = os.stat(src) if not self.recursive else os.lstat(src)
            except OSError as exc:
                err = failed(exc, "cannot read", src)
                yield encode_note(Kind.FAILURE, {"kind": err.kind, "message": str(err)})
                return
            yield from self._entry(src, name, st, top=True)
        yield end_note(self.counts)

    def _warn(self, name: bytes, kind: str, message: str) -> bytes:
        doc = {"path": show(name), "kind": kind, "message": message}
        self.counts.warnings.append(doc)
        return encode_note(Kind.WARNING, doc)

    def _entry(self, path: bytes, name: bytes, st: os.stat_result, top: bool = False
               ) -> Iterator[bytes | memoryview]:
        mode = st.st_mode
        if stat.S_ISREG(mode):
            yield from self._file(path, name, top)
            return
        common = Entry(Kind.FILE, name, stat.S_IMODE(mode), st.st_uid, st.st_gid,
                       st.st_mtime_ns)
        if stat.S_ISDIR(mode):
            yield encode_entry(replace(common, kind=Kind.DIR))
            self.counts.dirs += 1
            try:
                with os.scandir(path) as it:
                    children = sorted((e.name, _is_file(e)) for e in it)
            except OSError as exc:
                yield self._warn(name, failed(exc, "").kind,
                                 f"cannot list {show(path)}: {exc.strerror}")
                return
            depth = name.count(b"/") + 2
            for child, is_file in children:
                cpath = os.path.join(path, child)
                if depth > MAX_DEPTH or len(name) + 1 + len(child) > MAX_NAME:
                    yield self._warn(name + b"/" + child, "unsupported",
                                     f"not copied: {show(cpath)} is more than {MAX_DEPTH} "
                                     f"directories or {MAX_NAME} bytes below the copy's root")
                    continue
                if is_file:  # the directory says so: its open and fstat tell the rest
                    yield from self._file(cpath, name + b"/" + child, False)
                    continue
                try:
                    cst = os.lstat(cpath)
                except OSError as exc:
                    yield self._warn(name + b"/" + child, failed(exc, "").kind,
                                     f"cannot read {show(cpath)}: {exc.strerror}")
                    continue
                yield from self._entry(cpath, name + b"/" + child, cst)
        elif stat.S_ISLNK(mode):
            try:
                target = os.readlink(path)
            except OSError as exc:
                yield self._warn(name, failed(exc, "").kind,
                                 f"cannot read the link {show(path)}: {exc.strerror}")
                return
            yield encode_entry(replace(common, kind=Kind.LINK, link=target))
            self.counts.links += 1
        else:
            what = "a device node" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else (
                "a FIFO" if stat.S_ISFIFO(mode) else "a socket")
            yield self._warn(name, "unsupported", f"not copied: {show(path)} is {what}")

    def _file(self, path: bytes, name: bytes, top: bool) -> Iterator[bytes | memoryview]:
        """One file: exactly the size fstat gives once it is open (as scp and tar do, a file
        that grows meanwhile is sent up to that size; one that shrinks is not copied: a W
        record inside it, naming it, drops it at the receiver). A small one as one piece."""
        try:
            # O_NONBLOCK: if the file was replaced by a FIFO since lstat, do not hang on it.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (
                0 if top and not self.recursive else os.O_NOFOLLOW))
        except OSError as exc:
            yield self._warn(name, failed(exc, "").kind,
                             f"cannot read {show(path)}: {exc.strerror}")
            return
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                yield self._warn(name, "unsupported",
                                 f"not copied: {show(path)} changed type while being read")
                return
            offset = self.offset if top and len(self.sources) == 1 else 0
            if offset > fst.st_size:
                yield self._warn(name, "io", f"not copied: {show(path)} shrank below the "
                                 f"{offset} bytes to resume from")
                return
            pieces = self._file_pieces(fd, path, name, fst, offset)
            if fst.st_size - offset <= SMALL_FILE:
                yield b"".join(pieces)
            else:
                yield from pieces
        finally:
            os.close(fd)

    def _file_pieces(self, fd: int, path: bytes, name: bytes, fst: os.stat_result,
                     offset: int) -> Iterator[bytes]:
        """The records of the open file ``fd`` from ``offset``: its entry, its data, its end
        (or a W where it could not be read whole)."""
        size = fst.st_size
        digest = sha256() if self.checksum else None
        if offset:
            if digest is not None:
                _hash_fd(fd, offset, digest)
            os.lseek(fd, offset, os.SEEK_SET)
        yield encode_entry(Entry(Kind.FILE, name, stat.S_IMODE(fst.st_mode), fst.st_uid,
                                 fst.st_gid, fst.st_mtime_ns, size, offset))
        if self.on_file:
            self.on_file(show(name), size - offset)
        left = size - offset
        while left:
            try:
                data = os.read(fd, min(READ_CHUNK, left))
            except OSError as exc:
                yield self._warn(name, "io", f"cannot read {show(path)}: {exc.strerror}")
                return
            if not data:
                yield self._warn(name, "io", f"not copied: {show(path)} shrank while "
                                 f"being read ({size - left} of {size} bytes)")
                return
            left -= len(data)
            if digest is not None:
                digest.update(data)
            yield encode_chunk_header(len(data))
            yield data
            self.counts.bytes += len(data)
            if self.on_bytes:
                self.on_bytes(len(data))
        yield encode_file_end(digest.digest() if digest is not None else b"")
        self.counts.files += 1


def _is_file(entry: os.DirEntry[bytes]) -> bool:
    """Whether a directory's entry is a regular file, by its type in the directory (no
    system call where the file system gives it); False when unsure."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _hash_fd(fd: int, length: int, digest: hashlib._Hash, start: int = 0) -> int:
    """Feed ``length`` bytes of ``fd`` from ``start`` (the first ones by default) to
    ``digest`` (pread: the offset stays); returns how many there were."""
    done = 0
    while done < length:
        data = os.pread(fd, min(READ_CHUNK, length - done), start + done)
        if not data:
            break
        digest.update(data)
        done += len(data)
    return done


def hash_prefix(path: bytes, length: int) -> str:
    """sha256 (hex) of the first ``length`` bytes of ``path`` ("" if it is shorter)."""
    digest = sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest.hexdigest() if _hash_fd(fd, length, digest) == length else ""
    finally:
        os.close(fd)


# -- the receiver -------------------------------------------------------------------------------

@dataclass
class Target:
    """Where a copy lands: entries go into the directory ``fd``; the first component of each
    name is replaced by ``rename`` when set (``cp SRC NEWNAME``)."""

    fd: int
    rename: bytes | None


def open_target(dest: bytes, n_sources: int) -> Target:
    """Resolve DST as cp does: an existing directory receives the sources by their names;
    otherwise (one source) DST is the new name, in its parent directory. DST itself is the
    user's own path and may be reached through symlinks; nothing below it is."""
    try:
        return Target(os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), None)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise failed(exc, "cannot open", dest) from None
        if exc.errno == errno.ENOTDIR and dest.endswith(b"/"):
            raise CopyFailed("not-dir", f"{show(dest)} is not a directory", show(dest)) from None
        if n_sources > 1:
            kind = "not-dir" if exc.errno == errno.ENOTDIR or os.path.lexists(dest) else (
                "not-found")
            raise CopyFailed(kind, f"target {show(dest)} is not a directory "
                             f"(copying {n_sources} sources)", show(dest)) from None
    if dest.endswith(b"/"):
        raise CopyFailed("not-found", f"no such directory: {show(dest)}", show(dest))
    parent, leaf = os.path.split(dest)
    try:
        fd = os.open(parent or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise failed(exc, "cannot open the directory", parent) from None
    if leaf in (b".", b".."):
        os.close(fd)
        raise CopyFailed("usage", f"bad target name {show(dest)}", show(dest))
    return Target(fd, leaf)


@dataclass
class ReceiveCounts(Counts):
    """What a receiver wrote, and what the sender's E record said."""

    end: dict[str, object] | None = None
    #: Where a resumed file's data started (its part file held that much).
    resumed_from: int = 0


@dataclass
class _Dir:
    name: bytes
    fd: int
    entry: Entry | None  # set for a directory the stream made (its attributes, at the end)
    #: A new top directory made under this name (its part name) in the target, renamed to
    #: ``name`` when the stream leaves it: all below it is new and written at its own name.
    staged: bytes = b""


@dataclass
class _Open:
    entry: Entry
    dirfd: int
    leaf: bytes
    part: bytes
    fd: int
    digest: hashlib._Hash | None
    written: int = 0
    #: The part was created with the file's final mode (no chmod at the end).
    moded: bool = False


class Receiver:
    """Writes a stream's entries under ``target`` (see the module docstring for the rules).

    ``preserve``: modes and times as sent (else modes as sent less ``umask``, times now);
    ``chown``: owners as sent; ``allow_setid``: keep setuid/setgid; ``checksum``: a file's Z
    must carry a sha256 equal to what was written; ``resume``: a file whose entry has an
    offset continues its part file (which must be this user's, a regular file, and hold at
    least that many bytes); ``fsync``: each file reaches the disk before its rename, and each
    directory changed once the stream leaves it; ``unknown_size``: accept a file whose entry
    says UNKNOWN_SIZE (stdin pushed to a file; never from a guest). ``handle(event)`` raises
    CopyFailed to stop the copy; ``finish()`` after the E record, ``abort(keep_part)`` after
    any failure.
    """

    def __init__(self, target: Target, *, preserve: bool = False, chown: bool = False,
                 allow_setid: bool = False, checksum: bool = False, resume: bool = False,
                 on_file: Callable[[str, int], None] | None = None,
                 on_bytes: Callable[[int], None] | None = None, fsync: bool = False,
                 unknown_size: bool = False) -> None:
        self.target = target
        self.preserve = preserve
        self.chown = chown
        self.bits = 0o7777 if allow_setid else SAFE_BITS
        self.checksum = checksum
        self.resume = resume
        self.counts = ReceiveCounts()
        self.on_file = on_file
        self.on_bytes = on_bytes
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        self._stack: list[_Dir] = []
        self._file: _Open | None = None
        self.failure: Note | None = None
        self.fsync = fsync
        self.unknown_size = unknown_size
        #: Directory fds whose entries changed (fsynced when the stream leaves them).
        self._dirty: set[int] = set()
        self._space = FreeSpace()
        #: The staged top directory not yet renamed to its name (removed if the copy ends so).
        self._staging = b""

    # -- names ----------------------------------------------------------------------------
    def landed(self, name: bytes) -> str:
        """``name`` as it lands under DST (the first component renamed), for messages."""
        if self.target.rename is None:
            return show(name)
        _first, sep, rest = name.partition(b"/")
        return show(self.target.rename + sep + rest)

    def _place(self, name: bytes) -> tuple[int, bytes]:
        """The directory fd and leaf for ``name``, every parent opened without following."""
        parts = check_name(name)
        if self.target.rename is not None:
            parts[0] = self.target.rename
        parents, leaf = parts[:-1], parts[-1]
        keep = 0
        while keep < min(len(self._stack), len(parents)) and \
                self._stack[keep].name == parents[keep]:
            keep += 1
        while len(self._stack) > keep:
            self._pop()
        for comp in parents[keep:]:
            fd = self._stack[-1].fd if self._stack else self.target.fd
            try:
                sub = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CopyFailed("unsafe", f"refused {show(name)!r}: "
                                     f"{show(comp)!r} is not a directory (a symlink is "
                                     "never followed)", show(name)) from None
                raise failed(exc, "cannot open the directory", name) from None
            self._stack.append(_Dir(comp, sub, None))
        return (self._stack[-1].fd if self._stack else self.target.fd), leaf

    def _pop(self) -> None:
        d = self._stack.pop()
        try:
            if d.entry is not None:
                self._apply(d.fd, d.entry, is_dir=True)
            self._sync_dir(d.fd)
        finally:
            self._dirty.discard(d.fd)
            self._space.forget(d.fd)
            os.close(d.fd)
        if d.staged:
            self._unstage(d)

    def _staged(self) -> bool:
        """Whether the directory being written is inside a staged (all new) top directory."""
        return bool(self._stack) and bool(self._stack[0].staged)

    def _unstage(self, d: _Dir) -> None:
        """The staged top directory is complete: it takes its name."""
        try:
            # A directory that appeared at the name meanwhile is replaced only when empty.
            os.rename(d.staged, d.name, src_dir_fd=self.target.fd, dst_dir_fd=self.target.fd)
        except OSError as exc:
            raise CopyFailed("exists", f"cannot make the directory {self.landed(d.name)}: "
                             f"something of that name appeared during the copy ({exc.strerror})",
                             show(d.name)) from None
        self._staging = b""
        self._changed(self.target.fd)

    def _changed(self, dirfd: int) -> None:
        """An entry of the directory ``dirfd`` was made or renamed."""
        if self.fsync:
            self._dirty.add(dirfd)

    def _sync_dir(self, fd: int) -> None:
        if fd in self._dirty:
            self._dirty.discard(fd)
            try:
                os.fsync(fd)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: a file system without it
                    raise

    def _mode(self, entry: Entry) -> int:
        mode = entry.mode & self.bits
        return mode if self.preserve else mode & ~self._umask

    def _final_mode(self, entry: Entry) -> int:
        """A file's mode once complete (sticky and set-id bits only with ``preserve``)."""
        return self._mode(entry) if self.preserve else self._mode(entry) & 0o777

    def _part_mode(self, entry: Entry) -> int:
        """The mode a new part file is created with: the file's final mode when that lets
        no one else write it, the owner read and write it (a part kept for ``--resume`` is
        reopened read-write), has no special bit and the umask keeps it whole (then no
        chmod is needed once it is complete: one system call less per file); else 0600."""
        mode = self._final_mode(entry)
        if mode & ~0o755 or mode & 0o600 != 0o600 or mode & self._umask:
            return 0o600
        return mode

    def _apply(self, fd: int, entry: Entry, is_dir: bool = False, chmod: bool = True) -> None:
        """Owner, mode (unless not ``chmod``) and times of an open file or directory."""
        if self.chown:
            os.fchown(fd, entry.uid, entry.gid)
        if chmod and (self.preserve or is_dir):
            os.fchmod(fd, self._mode(entry))
        if self.preserve:
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    # -- events -----------------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        """Act on one decoded record."""
        name = self._file.entry.name if self._file else getattr(event, "name", b"")
        try:
            if isinstance(event, Chunk):
                self._chunk(event.data)
            elif isinstance(event, FileEnd):
                self._file_end(event.sha256)
            elif isinstance(event, Entry):
                if event.kind is Kind.FILE:
                    self._file_start(event)
                elif event.kind is Kind.DIR:
                    self._dir(event)
                else:
                    self._link(event)
            elif isinstance(event, Note):
                self._note(event)
        except OSError as exc:
            raise failed(exc, "cannot write", name) from None
        except (ValueError, OverflowError) as exc:  # a field the OS refuses (a NUL, a range)
            raise CopyFailed("protocol", f"bad entry from the sender: {show(name[:300])!r}: "
                             f"{exc}", show(name)) from None

    def _note(self, note: Note) -> None:
        doc = note_doc(note)
        if note.kind is Kind.WARNING:
            if self._file is not None:  # the sender could not finish this file
                self._discard(keep=False)
            if len(self.counts.warnings) < MAX_WARNINGS:
                self.counts.warnings.append(doc)
        elif note.kind is Kind.END:
            self.counts.end = note.doc
        else:
            kind = doc["kind"]
            raise CopyFailed(kind if kind in KINDS else "io",
                             doc["message"] or "the sender failed", doc["path"])

    def _dir(self, entry: Entry) -> None:
        fd, leaf = self._place(entry.name)
        if not self._stack and not self.resume and (stage := self._stage(leaf)):
            sub = os.open(stage, _DIR_FLAGS, dir_fd=fd)
            self._stack.append(_Dir(leaf, sub, entry, staged=stage))
            self.counts.dirs += 1
            return
        try:
            os.mkdir(leaf, 0o700, dir_fd=fd)
            made = True
            self._changed(fd)
        except FileExistsError:
            made = False
        try:
            sub = os.open(leaf, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CopyFailed("not-dir", f"cannot make the directory "
                                 f"{self.landed(entry.name)}: "
                                 "a file or symlink of that name is in the way",
                                 show(entry.name)) from None
            raise
        self._stack.append(_Dir(leaf, sub, entry if made or self.preserve else None))
        self.counts.dirs += 1

    def _stage(self, leaf: bytes) -> bytes:
        """Make the staging directory for a new top directory ``leaf``: its part name, or
        b"" when ``leaf`` (or that name) is already there."""
        fd = self.target.fd
        try:
            os.stat(leaf, dir_fd=fd, follow_symlinks=False)
            return b""
        except FileNotFoundError:
            pass
        stage = part_name(leaf)
        try:
            os.mkdir(stage, 0o700, dir_fd=fd)
        except FileExistsError:  # left by an interrupted copy: not ours to remove
            return b""
        self._staging = stage
        return stage

    def _link(self, entry: Entry) -> None:
        fd, leaf = self._place(entry.name)
        if b"\0" in entry.link:
            raise CopyFailed("unsafe", f"refused the symlink {show(entry.name[:300])!r}: a NUL "
                             "byte in its target", show(entry.name))
        tmp = leaf if self._staged() else part_name(leaf)
        _unlink_quiet(tmp, fd)
        os.symlink(entry.link, tmp, dir_fd=fd)
        try:
            if self.chown:
                os.chown(tmp, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)
            if self.preserve:
                os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd,
                         follow_symlinks=False)
            if tmp != leaf:
                _rename(tmp, leaf, fd, lambda: self.landed(entry.name))
        except BaseException:
            _unlink_quiet(tmp, fd)
            raise
        self._changed(fd)
        self.counts.links += 1

    def _file_start(self, entry: Entry) -> None:
        dirfd, leaf = self._place(entry.name)
        # In a staged directory the file is written at its name: no one else can reach it.
        part = leaf if self._staged() else part_name(leaf)
        if entry.size == UNKNOWN_SIZE:
            if not self.unknown_size:
                raise CopyFailed("protocol", f"{show(entry.name)}: the sender announced no "
                                 "size", show(entry.name))
        elif (free := self._space.take(dirfd, entry.size - entry.offset)) >= 0:
            raise CopyFailed("no-space", f"cannot write {self.landed(entry.name)}: no space "
                             f"left on the target's file system ({entry.size - entry.offset} "
                             f"bytes to write, {free} free)", show(entry.name))
        digest = sha256() if self.checksum else None
        moded = False
        if entry.offset:
            if not self.resume:
                raise CopyFailed("protocol", f"{show(entry.name)}: the sender resumed a copy "
                                 "that was not asked to resume", show(entry.name))
            fd = os.open(part, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or \
                    st.st_size < entry.offset or st.st_nlink != 1:
                os.close(fd)
                raise CopyFailed("resume", f"{show(entry.name)}: the part file cannot be "
                                 "resumed (not this user's plain file, or shorter)",
                                 show(entry.name))
            os.ftruncate(fd, entry.offset)
            self.counts.resumed_from = entry.offset
            if digest is not None:
                _hash_fd(fd, entry.offset, digest)
            os.lseek(fd, entry.offset, os.SEEK_SET)
        else:
            # read-write: a checksum of data written by another process is read back
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            mode = self._part_mode(entry)
            try:
                fd = os.open(part, flags, mode, dir_fd=dirfd)
            except FileExistsError:  # a part left by an earlier copy (or a name sent twice)
                try:
                    os.unlink(part, dir_fd=dirfd)
                except IsADirectoryError:
                    raise CopyFailed("is-dir", f"cannot overwrite the directory "
                                     f"{self.landed(entry.name)} with a file",
                                     show(entry.name)) from None
                fd = os.open(part, flags, mode, dir_fd=dirfd)
            moded = mode == self._final_mode(entry) and not mode & self._umask
        self._file = _Open(entry, dirfd, leaf, part, fd, digest, moded=moded)
        if self.on_file:
            self.on_file(show(entry.name), entry.size - entry.offset)

    def _chunk(self, data: bytes) -> None:
        f = self._file
        assert f is not None  # the decoder checks the order
        if (err := over_size(f.entry, f.entry.offset + f.written, len(data))) is not None:
            raise err
        view = memoryview(data)
        while view:
            view = view[os.write(f.fd, view):]
        if f.digest is not None:
            f.digest.update(data)
        f.written += len(data)
        self.counts.bytes += len(data)
        if self.on_bytes:
            self.on_bytes(len(data))

    def direct_fd(self) -> int:
        """The part file being written, for data that another process writes into it (the
        fast path: docs/files.md); -1 outside a file."""
        return self._file.fd if self._file is not None else -1

    def entry_name(self) -> bytes:
        """The name of the file being written (b"" outside a file)."""
        return self._file.entry.name if self._file is not None else b""

    def wrote_directly(self, offset: int, n: int) -> None:
        """``n`` bytes from ``offset`` were written into ``direct_fd()`` by another process:
        counted, and hashed (read back) with a checksum."""
        f = self._file
        assert f is not None
        if (err := over_size(f.entry, f.entry.offset + f.written, n)) is not None:
            raise err
        if f.digest is not None:
            try:
                _hash_fd(f.fd, n, f.digest, offset)
            except OSError as exc:
                raise failed(exc, "cannot read back", f.entry.name) from None
        f.written += n
        self.counts.bytes += n  # the caller reports the progress it saw

    def _file_end(self, sha256: bytes) -> None:
        f = self._file
        assert f is not None
        if (err := short_file(f.entry, f.entry.offset + f.written)) is not None:
            raise err
        if f.digest is not None:
            if not sha256:
                raise CopyFailed("checksum", f"{show(f.entry.name)}: the sender sent no "
                                 "checksum", show(f.entry.name))
            if f.digest.digest() != sha256:
                raise CopyFailed("checksum", f"{show(f.entry.name)}: sha256 differs between "
                                 "the two ends", show(f.entry.name))
        self._apply(f.fd, f.entry, chmod=not f.moded)
        if not self.preserve and not f.moded:
            os.fchmod(f.fd, self._final_mode(f.entry))
        if self.fsync:
            os.fsync(f.fd)
        os.close(f.fd)
        f.fd = -1
        if f.part != f.leaf:
            _rename(f.part, f.leaf, f.dirfd, lambda: self.landed(f.entry.name))
        self._changed(f.dirfd)
        self._file = None
        self.counts.files += 1

    # -- the end ----------------------------------------------------------------------------
    def finish(self) -> None:
        """The stream ended well: directories get their attributes, fds are closed."""
        if self._file is not None:
            raise CopyFailed("protocol", "the stream ended inside a file")
        try:
            while self._stack:
                self._pop()
            self._sync_dir(self.target.fd)
        except OSError as exc:
            raise failed(exc, "cannot set the attributes of a directory") from None
        finally:
            self.close()

    def _discard(self, keep: bool) -> None:
        f = self._file
        if f is None:
            return
        self._file = None
        if f.fd >= 0:
            os.close(f.fd)
        if not keep:
            _unlink_quiet(f.part, f.dirfd)

    def abort(self, keep_part: bool = False) -> None:
        """After a failure: the part file being written is removed (kept with ``keep_part``,
        for a later ``--resume``); fds are closed."""
        self._discard(keep_part)
        self.close()

    def close(self) -> None:
        """Close every directory fd (idempotent); a staged directory that did not take its
        name (the copy failed) is removed."""
        self._dirty.clear()
        while self._stack:
            fd = self._stack.pop().fd
            self._space.forget(fd)
            os.close(fd)
        if self._staging and self.target.fd >= 0:
            _remove_tree(self._staging, self.target.fd)
            self._staging = b""
        if self.target.fd >= 0:
            self._space.forget(self.target.fd)
            os.close(self.target.fd)
            self.target.fd = -1


def _rename(part: bytes, leaf: bytes, dirfd: int, landed: Callable[[], str]) -> None:
    """Rename the part over its name; ``landed()``: that name for a message."""
    try:
        os.rename(part, leaf, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except IsADirectoryError:
        _unlink_quiet(part, dirfd)
        name = landed()
        raise CopyFailed("is-dir", f"cannot overwrite the directory {name} with a file",
                         name) from None


def _remove_tree(name: bytes, dirfd: int) -> None:
    """Remove the directory ``name`` of ``dirfd`` and all in it, following no symlink
    (best effort: what cannot be removed stays)."""
    # Bottom-up: each directory's fd is open while it is visited, its subdirectories empty.
    for _root, dirs, files, rootfd in os.fwalk(name, topdown=False, follow_symlinks=False,
                                               dir_fd=dirfd):
        try:
            os.fchmod(rootfd, 0o700)  # a directory of the copy's, made read-only at its end
        except OSError:
            pass
        for leaf in files:
            _unlink_quiet(leaf, rootfd)
        for leaf in dirs:
            try:
                os.rmdir(leaf, dir_fd=rootfd)
            except OSError:
                _unlink_quiet(leaf, rootfd)  # a symlink to a directory
    try:
        os.rmdir(name, dir_fd=dirfd)
    except OSError:
        pass


def _unlink_quiet(name: bytes, dirfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def probe_part(dest: bytes, name: bytes) -> tuple[int, str]:
    """For ``--resume``: the size and sha256 (hex) of the part file a copy of the source
    called ``name`` to ``dest`` would continue; (0, "") when there is none usable."""
    try:
        target = open_target(dest, 1)
    except CopyFailed:
        return 0, ""
    try:
        leaf = target.rename or name
        try:
            fd = os.open(part_name(leaf), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=target.fd)
        except OSError:
            return 0, ""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or not st.st_size:
                return 0, ""
            digest = sha256()
            size = _hash_fd(fd, st.st_size, digest)
            return size, digest.hexdigest()
        finally:
            os.close(fd)
    finally:
        os.close(target.fd)


class StdoutReceiver:
    """``cp VM:FILE -``: the data of exactly one file, to ``fd``; anything else fails."""

    def __init__(self, fd: int, checksum: bool = False,
                 on_file: Callable[[str, int], None] | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        self.fd = fd
        self.counts = ReceiveCounts()
        self.digest = sha256() if checksum else None
        self.on_file = on_file
        self.on_bytes = on_bytes
        self._entry: Entry | None = None

    def handle(self, event: Event) -> None:
        """Write a file's data (exactly the size it announced); refuse a second entry or a
        directory."""
        if isinstance(event, Entry):
            if event.kind is not Kind.FILE or self._entry is not None:
                raise CopyFailed("usage", "only one regular file can be written to stdout")
            if event.offset or event.size == UNKNOWN_SIZE:
                raise CopyFailed("protocol", f"{show(event.name)}: the sender resumed, or "
                                 "announced no size", show(event.name))
            self._entry = event
            if self.on_file:
                self.on_file(show(event.name), event.size)
        elif isinstance(event, Chunk):
            assert self._entry is not None  # the decoder checks the order
            if (err := over_size(self._entry, self.counts.bytes, len(event.data))) is not None:
                raise err
            view = memoryview(event.data)
            while view:
                view = view[os.write(self.fd, view):]
            if self.digest is not None:
                self.digest.update(event.data)
            self.counts.bytes += len(event.data)
            if self.on_bytes:
                self.on_bytes(len(event.data))
        elif isinstance(event, FileEnd):
            assert self._entry is not None
            if (err := short_file(self._entry, self.counts.bytes)) is not None:
                raise err
            if self.digest is not None and self.digest.digest() != event.sha256:
                raise CopyFailed("checksum", "sha256 differs between the two ends")
            self.counts.files += 1
        elif isinstance(event, Note):
            doc = note_doc(event)
            if event.kind is Kind.FAILURE:
                raise CopyFailed(doc["kind"] if doc["kind"] in KINDS else "io",
                                 doc["message"] or "the sender failed", doc["path"])
            if event.kind is Kind.WARNING:
                if len(self.counts.warnings) < MAX_WARNINGS:
                    self.counts.warnings.append(doc)
            else:
                self.counts.end = event.doc

    def finish(self) -> None:
        """Nothing to do: stdout is not closed here."""

    def abort(self, keep_part: bool = False) -> None:
        """Nothing to remove."""
