"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) as one uint8 tensor.

``load()`` returns all 1,623 characters x 20 drawings, resized to 28x28:

1. **Find** the two official archives ``images_background.zip`` (30 alphabets,
   964 characters) and ``images_evaluation.zip`` (20 alphabets, 659
   characters) in the data folder: ``root=`` if given, else ``$MLBOOK_DATA``,
   else ``~/.cache/mlbook``. The archives are looked for in ``<root>/omniglot/``
   (or in ``<root>`` itself when it holds them).
2. **Download** a missing archive from the official repository
   (brendenlake/omniglot, ``python/``) into a temporary file next to its
   destination, check its MD5 against the official one, then rename it into
   place; a download with another MD5 is deleted and an error raised.
3. **Check** an archive that is already there. The official MD5 is accepted
   as it is. An archive with another MD5 (such as a copy whose zip container
   was rebuilt) is accepted only when (a) a ``SHA256SUMS`` file beside it,
   when present, lists it with a matching SHA-256, and (b) its contents are
   the Omniglot image set: the expected numbers of alphabets, characters and
   images (30 / 964 / 19,280 and 20 / 659 / 13,180), exactly 20 drawings per
   character (drawers 01..20), and every image a decodable 105x105 PNG. The
   contents checks (b) run for every archive, official or not, when the cache
   is built. Anything else raises :class:`OmniglotError` saying what is wrong.
4. **Read** the PNGs straight from the zip (nothing is unpacked to disk).
   Every member name is checked first, as :func:`extract` does: absolute
   paths, ``..`` components, drive letters, backslashes and symbolic links are
   refused, so a crafted archive can never reach outside its folder. A
   truncated or corrupt zip (bad central directory, bad CRC) raises
   :class:`OmniglotError`; no partial result is ever cached.
5. **Resize** each 105x105 image once to 28x28 with Pillow's LANCZOS filter
   (as the MAML authors' resizing script does), and invert it so strokes are
   bright (255) on a dark (0) background, as in the MAML code.
6. **Cache** the result as ``omniglot28.pt`` (uint8 ``[1623, 20, 28, 28]``,
   about 25 MB) plus a manifest ``omniglot28.json`` in the cache folder:
   ``cache=`` if given, else ``$MLBOOK_CACHE``, else ``~/.cache/mlbook``. Both
   are written to a temporary file and renamed, the manifest last; the manifest
   records the archives' SHA-256 and the tensor file's SHA-256, so a cache from
   other archives, or one an interrupted run left behind, is never used. The
   data folder itself is only read (it may be read-only, as in CI).

Character order: background archive first, then evaluation; within each,
alphabets sorted by name, then characters (``character01``, ...); drawings in
drawer order 01..20. :mod:`mlbook.fewshot` splits and rotates them.
Introduced in ``book/07_few_shot_images``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

__all__ = [
    "Omniglot", "OmniglotError", "load", "download", "extract", "verify",
    "data_root", "archive_dir", "cache_root", "ARCHIVES", "IMAGE_SIZE",
]

IMAGE_SIZE = 28           # side of the cached images
ORIGINAL_SIZE = 105       # side of the PNGs in the archives
DRAWINGS = 20             # drawings (drawers) per character
CACHE_NAME = "omniglot28"
CACHE_VERSION = 1
URL = "https://github.com/brendenlake/omniglot/raw/master/python/"


@dataclass(frozen=True)
class Archive:
    """One official archive and what it must contain."""

    split: str
    filename: str
    md5: str
    alphabets: int
    characters: int

    @property
    def url(self) -> str:
        return URL + self.filename

    @property
    def images(self) -> int:
        return self.characters * DRAWINGS


ARCHIVES = (
    Archive("background", "images_background.zip",
            "68d2efa1b9178cc56df9314c21c6e718", alphabets=30, characters=964),
    Archive("evaluation", "images_evaluation.zip",
            "6b91aef0f799c5bb55b94e3f2daec811", alphabets=20, characters=659),
)

# images_background/<Alphabet>/characterNN/XXXX_YY.png (XXXX: global id, YY: drawer)
_PNG = re.compile(r"^images_(background|evaluation)/([^/]+)/(character\d+)/"
                  r"(\d{4})_(\d{2})\.png$")


class OmniglotError(RuntimeError):
    """The Omniglot archives are missing, unsafe, corrupt or not Omniglot."""


@dataclass
class Omniglot:
    """All characters: ``images`` uint8 ``[characters, 20, 28, 28]`` (strokes
    255, background 0); per character its ``alphabet`` name, ``character``
    folder name and ``split`` (``"background"`` or ``"evaluation"``)."""

    images: torch.Tensor
    alphabet: list
    character: list
    split: list

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_alphabets(self) -> int:
        return len(set(zip(self.split, self.alphabet, strict=True)))


# -- where things live ----------------------------------------------------------
def data_root(root=None) -> Path:
    """The data folder: ``root``, else ``$MLBOOK_DATA``, else ``~/.cache/mlbook``."""
    if root is None:
        root = os.environ.get("MLBOOK_DATA") or Path.home() / ".cache" / "mlbook"
    return Path(root).expanduser()


def archive_dir(root=None) -> Path:
    """Folder holding the zips: ``<root>/omniglot``, or ``<root>`` when the
    zips are directly in it."""
    base = data_root(root)
    if any((base / a.filename).exists() for a in ARCHIVES):
        return base
    return base / "omniglot"


def cache_root(cache=None) -> Path:
    """The (writable) cache folder: ``cache``, else ``$MLBOOK_CACHE``, else
    ``~/.cache/mlbook``."""
    if cache is None:
        cache = os.environ.get("MLBOOK_CACHE") or Path.home() / ".cache" / "mlbook"
    return Path(cache).expanduser()


# -- checksums and download -------------------------------------------------------
def _digests(path: Path) -> tuple[str, str]:
    """(md5, sha256) of a file, in one pass."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def _fetch(url: str, dest: Path):
    """Copy ``url`` into the open-for-writing path ``dest`` (tests replace this)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def download(archive: Archive, folder) -> Path:
    """Download ``archive`` into ``folder``: to a temporary file first, then
    check the official MD5, then rename. Returns the final path."""
    folder = Path(folder)
    dest = folder / archive.filename
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=archive.filename + ".", suffix=".part",
                                   dir=folder)
    except OSError as e:
        raise OmniglotError(
            f"{archive.filename} is missing and cannot be downloaded into {folder} "
            f"({e}); point MLBOOK_DATA (or root=) at a writable folder"
        ) from e
    os.close(fd)
    tmp = Path(tmp)
    try:
        print(f"downloading {archive.url}", file=sys.stderr)
        try:
            _fetch(archive.url, tmp)
        except OSError as e:
            raise OmniglotError(
                f"could not download {archive.url} ({e}); download it by hand into "
                f"{folder}, or point MLBOOK_DATA at a folder holding omniglot/"
            ) from e
        md5, _ = _digests(tmp)
        if md5 != archive.md5:
            raise OmniglotError(
                f"downloaded {archive.filename} has MD5 {md5}, not the official "
                f"{archive.md5}: the download is corrupt or the file changed upstream; "
                "it was deleted"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _sha256sums(folder: Path) -> dict:
    path = folder / "SHA256SUMS"
    if not path.exists():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def verify(path, archive: Archive) -> dict:
    """Check an archive's checksum: ``{"accepted": how, "md5": ..., "sha256": ...}``.

    ``how`` is ``"official-md5"`` when its MD5 is the official one. Otherwise a
    ``SHA256SUMS`` file beside it, when present, must list it with the same
    SHA-256 (``"sha256sums"``), and when there is none the archive is
    ``"contents-only"``: either way its contents are then checked in full
    while it is read. A mismatch raises :class:`OmniglotError`.
    """
    path = Path(path)
    md5, sha = _digests(path)
    if md5 == archive.md5:
        return dict(accepted="official-md5", md5=md5, sha256=sha)
    listed = _sha256sums(path.parent).get(path.name)
    if listed is not None and listed != sha:
        raise OmniglotError(
            f"{path} has SHA-256 {sha}, but SHA256SUMS beside it says {listed}: the "
            "file is damaged or was replaced; fetch it again"
        )
    how = "sha256sums" if listed is not None else "contents-only"
    return dict(accepted=how, md5=md5, sha256=sha)


# -- safe reading and extraction ----------------------------------------------------
def _safe_name(info: zipfile.ZipInfo, archive) -> PurePosixPath:
    """The member's relative path, or an error if it could escape its folder."""
    name = info.filename
    mode = info.external_attr >> 16
    problem = None
    if stat.S_ISLNK(mode):
        problem = "is a symbolic link"
    elif "\\" in name or "\x00" in name:
        problem = "contains a backslash or NUL"
    elif name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        problem = "is an absolute path"
    elif ".." in PurePosixPath(name).parts:
        problem = "contains '..'"
    if problem:
        raise OmniglotError(
            f"refusing archive {archive}: member {name!r} {problem}, which could "
            "write outside the target folder"
        )
    return PurePosixPath(name)


def _open_zip(path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise OmniglotError(
            f"{path} is not a readable zip archive ({e}): it is truncated or corrupt "
            "(an interrupted download?); delete it and download it again"
        ) from e


def _read_member(zf: zipfile.ZipFile, info, path) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise OmniglotError(
            f"{path}: member {info.filename!r} cannot be read ({e}): the archive is "
            "corrupt; delete it and download it again"
        ) from e


def extract(path, dest) -> Path:
    """Unpack the zip ``path`` into the folder ``dest`` safely and atomically.

    Every member name is checked first (no absolute paths, ``..``, drive
    letters or symbolic links); the archive is unpacked into a temporary folder
    beside ``dest`` that is renamed to ``dest`` only when every member was read
    without error, so a corrupt archive never leaves a half-filled ``dest``.
    ``dest`` must not exist yet. Not needed by :func:`load`, which reads the
    images straight from the zip; it is here for those who want the PNGs.
    """
    path, dest = Path(path), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; extract into a new folder")
    with _open_zip(path) as zf:
        infos = zf.infolist()
        names = [_safe_name(info, path) for info in infos]  # all, before writing
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", suffix=".tmp",
                                    dir=dest.parent))
        try:
            for info, name in zip(infos, names, strict=True):
                target = tmp.joinpath(*name.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(_read_member(zf, info, path))
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return dest


def _resize(png: bytes, member: str, path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(png)) as im:
            if im.size != (ORIGINAL_SIZE, ORIGINAL_SIZE):
                raise OmniglotError(
                    f"{path}: {member} is {im.size[0]}x{im.size[1]}, Omniglot images "
                    f"are {ORIGINAL_SIZE}x{ORIGINAL_SIZE}"
                )
            small = im.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE),
                                           resample=Image.LANCZOS)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise OmniglotError(f"{path}: {member} is not a readable PNG ({e})") from e
    return 255 - np.asarray(small, dtype=np.uint8)  # strokes bright, background 0


def read_archive(path, archive: Archive):
    """Decode, check and resize one archive: ``(images [C, 20, 28, 28] uint8,
    alphabets, characters)``; raises :class:`OmniglotError` on any problem."""
    path = Path(path)
    groups: dict = {}
    with _open_zip(path) as zf:
        infos = zf.infolist()
        for info in infos:
            _safe_name(info, path)
        for info in infos:
            m = _PNG.match(info.filename)
            if info.is_dir() or m is None:
                continue  # directory entries, and anything that is not a drawing
            if m.group(1) != archive.split:
                raise OmniglotError(
                    f"{path}: member {info.filename!r} belongs to images_{m.group(1)},"
                    f" not images_{archive.split}; are the two archives swapped?"
                )
            key = (m.group(2), m.group(3))
            drawer = int(m.group(5))
            pixels = _resize(_read_member(zf, info, path), info.filename, path)
            groups.setdefault(key, {})[drawer] = pixels
    alphabets = sorted({a for a, _ in groups})
    found = (len(alphabets), len(groups), sum(len(d) for d in groups.values()))
    expected = (archive.alphabets, archive.characters, archive.images)
    if found != expected:
        raise OmniglotError(
            f"{path} holds {found[0]} alphabets, {found[1]} characters and {found[2]} "
            f"images; images_{archive.split} has {expected[0]}, {expected[1]} and "
            f"{expected[2]}: this is not (all of) the Omniglot archive"
        )
    keys = sorted(groups)
    for key in keys:
        if sorted(groups[key]) != list(range(1, DRAWINGS + 1)):
            raise OmniglotError(
                f"{path}: {key[0]}/{key[1]} has drawers {sorted(groups[key])}, "
                f"expected exactly 01..{DRAWINGS:02d}"
            )
    images = np.stack([np.stack([groups[k][d] for d in range(1, DRAWINGS + 1)])
                       for k in keys])  # [C, 20, 28, 28]
    return torch.from_numpy(images), [k[0] for k in keys], [k[1] for k in keys]


# -- the cache ------------------------------------------------------------------------
def _write_atomic(path: Path, write):
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _load_cache(folder: Path, sources: dict):
    pt, js = folder / f"{CACHE_NAME}.pt", folder / f"{CACHE_NAME}.json"
    if not (pt.exists() and js.exists()):
        return None
    try:
        manifest = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != CACHE_VERSION or manifest.get("archives") != sources:
        return None  # built from other archives or by another loader version
    if _digests(pt)[1] != manifest.get("tensor_sha256"):
        return None  # left behind by an interrupted run, or damaged
    state = torch.load(pt, map_location="cpu", weights_only=True)
    return Omniglot(state["images"], state["alphabet"], state["character"],
                    state["split"])


def _save_cache(folder: Path, data: Omniglot, sources: dict):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        pt, js = folder / f"{CACHE_NAME}.pt", folder / f"{CACHE_NAME}.json"
        state = dict(images=data.images, alphabet=data.alphabet,
                     character=data.character, split=data.split)
        _write_atomic(pt, lambda p: torch.save(state, p))
        manifest = dict(
            version=CACHE_VERSION, archives=sources, tensor_sha256=_digests(pt)[1],
            shape=list(data.images.shape), dtype="uint8",
            resize=f"PIL LANCZOS {ORIGINAL_SIZE}->{IMAGE_SIZE}, inverted (strokes 255)",
        )
        _write_atomic(js, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    except OSError as e:  # a read-only home, say: carry on without a cache
        print(f"note: could not write the Omniglot cache in {folder} ({e})",
              file=sys.stderr)


def load(root=None, cache=None, download_missing: bool = True,
         progress: bool = True) -> Omniglot:
    """All 1,623 Omniglot characters as 28x28 uint8 images (see the module doc).

    ``root``: data folder (default ``$MLBOOK_DATA`` or ``~/.cache/mlbook``);
    ``cache``: where the decoded tensors are cached (default ``$MLBOOK_CACHE``
    or ``~/.cache/mlbook``); ``download_missing=False`` raises instead of
    downloading a missing archive.
    """
    folder = archive_dir(root)
    sources, paths = {}, {}
    for archive in ARCHIVES:
        path = folder / archive.filename
        if not path.exists():
            if not download_missing:
                raise OmniglotError(
                    f"{path} is missing; set MLBOOK_DATA to a folder holding "
                    "omniglot/images_background.zip and images_evaluation.zip, "
                    "or allow the download"
                )
            path = download(archive, folder)
        check = verify(path, archive)
        sources[archive.split] = dict(file=archive.filename, sha256=check["sha256"],
                                      accepted=check["accepted"])
        paths[archive.split] = path
    cache_folder = cache_root(cache)
    data = _load_cache(cache_folder, sources)
    if data is not None:
        return data
    if progress:
        print("building the 28x28 Omniglot cache (once; about a minute)...",
              file=sys.stderr)
    parts = [read_archive(paths[a.split], a) for a in ARCHIVES]
    data = Omniglot(
        images=torch.cat([p[0] for p in parts]),
        alphabet=[a for p in parts for a in p[1]],
        character=[c for p in parts for c in p[2]],
        split=[a.split for a, p in zip(ARCHIVES, parts, strict=True) for _ in p[2]],
    )
    _save_cache(cache_folder, data, sources)
    return data
