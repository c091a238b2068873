"""`kws data download`: fetch the official Speech Commands v0.02 archive and unpack it safely.
The `kws data` command is registered here, with its other action, `synth` (kws.synth): neither
needs torch, which the dataset reader (kws.data) does."""

import os
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from kws.errors import KwsError
from kws.labels import WORDS

URL = "https://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
SPLIT_LISTS = ("validation_list.txt", "testing_list.txt")
CHUNK = 1 << 20


def fetch(url: str, dest, stream=None) -> int:
    """Copy `url` to the file `dest` with a progress line (on stderr by default); returns the
    byte count."""
    stream = stream or sys.stderr
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise KwsError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
    with response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        done, start = 0, time.monotonic()
        try:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                speed = done / max(time.monotonic() - start, 1e-9)
                of_total = f"/{total / 1e6:.1f}" if total else ""
                print(f"\r{done / 1e6:.1f}{of_total} MB  {speed / 1e6:.1f} MB/s", end="",
                      file=stream, flush=True)
        except OSError as e:
            raise KwsError(f"download of {url} broke off after {done:,} bytes: {e}") from None
        print(file=stream)
    if total and done != total:
        raise KwsError(f"download of {url} is incomplete: {done:,} of {total:,} bytes")
    return done


def check_member(member: tarfile.TarInfo, root: Path) -> None:
    """Refuse members that would land outside `root`: absolute paths, "..", links out of it,
    devices."""
    target = (root / member.name).resolve()
    if os.path.isabs(member.name) or ".." in Path(member.name).parts \
            or not target.is_relative_to(root):
        raise KwsError(f"archive member {member.name!r} points outside the target folder")
    if member.issym() or member.islnk():
        base = target.parent if member.issym() else root
        if os.path.isabs(member.linkname) or not (base / member.linkname).resolve() \
                .is_relative_to(root):
            raise KwsError(f"archive link {member.name!r} -> {member.linkname!r} "
                           "points outside the target folder")
    elif not (member.isfile() or member.isdir()):
        raise KwsError(f"archive member {member.name!r} is not a file or folder")


def unpack(archive, dest) -> None:
    """Unpack a .tar.gz into `dest`, checking every member before anything is written."""
    root = Path(dest).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                check_member(member, root)
            tar.extractall(root, members=members, filter="data")
    except (tarfile.TarError, EOFError) as e:  # tarfile's own message runs to several lines
        raise KwsError(f"the download is not a readable .tar.gz archive ({type(e).__name__})") from None


def check_layout(root) -> list[str]:
    """The problems that keep `root` from being a Speech Commands folder (empty when fine)."""
    root = Path(root)
    problems = [f"missing {name}" for name in SPLIT_LISTS if not (root / name).is_file()]
    missing = [w for w in WORDS if not (root / w).is_dir()]
    if missing:
        problems.append(f"missing word folders: {', '.join(missing)}")
    return problems


def make_folder(path: Path) -> None:
    """Create `path` and its parents; a KwsError naming the folder when that fails or when the
    folder cannot be written in (before any download or render, not after)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KwsError(f"cannot create the folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise KwsError(f"cannot write in the folder {path}: permission denied")


def download(dest, url: str = URL, stream=None) -> None:
    dest = Path(dest)
    make_folder(dest)
    # The download is unpacked next to DIR (a 2.3 GB archive need not fit in /tmp) and checked
    # there: only the dataset's layout is moved into DIR, and anything else leaves DIR as it was.
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        archive, unpacked = Path(tmp) / "archive.tar.gz", Path(tmp) / "unpacked"
        fetch(url, archive, stream)
        unpack(archive, unpacked)
        archive.unlink()
        problems = check_layout(unpacked)
        if problems:
            raise KwsError(f"the download is not Speech Commands ({'; '.join(problems)}); "
                           f"nothing was put in {dest}")
        move_into(unpacked, dest)


def move_into(source: Path, dest: Path) -> None:
    """Every entry of the folder `source` renamed into `dest` (same file system, so nothing is
    copied), folders that both hold merged, files in `dest` replaced."""
    for entry in source.iterdir():
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            move_into(entry, target)
        else:
            os.replace(entry, target)


def download_command(args):
    download(args.dir, args.url)
    print(f"Speech Commands unpacked in {args.dir}")


def register(sub):
    from kws import synth

    group = sub.add_parser("data", help="get the dataset or render synthetic speech")
    data_sub = group.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser("download", help="download and unpack Speech Commands v0.02 (2.3 GB)")
    p.add_argument("dir", metavar="DIR", help="folder to unpack into")
    p.add_argument("--url", default=URL, help="archive URL (default: the official v0.02 one)")
    p.set_defaults(func=download_command)
    synth.register(data_sub)
