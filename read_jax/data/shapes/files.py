"""Writing the generated set: every file atomically (written beside, then renamed), and the marker that says
a directory belongs to the generator.

The marker (`MARKER`, json) holds the seed and, for each index file (an annotation file that lists many
scenes: RefCOCO's refs pickle and instances.json, LLaVA's json, PACO's json), the sha256 of the bytes the
generator last wrote there. An index file is rewritten on a top-up only while it still holds those bytes:
a hand-edited one stays as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

log = logging.getLogger(__name__)

# A directory holding this file belongs to the generator: `data.make_shapes` writes only into such a one.
MARKER = ".read_jax_shapes.json"
GENERATOR = "read_jax.data.make_shapes"


def atomic_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file beside it and a rename: never half-written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_image(path: str, im, fmt: str) -> None:
    """Save a PIL image (JPEG quality 92 or PNG) atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    im.save(tmp, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    os.replace(tmp, path)


_TMP = re.compile(r".+\.tmp\d+$")


def remove_stale_tmp(out: str) -> int:
    """Delete the temporary files an interrupted write left in `out` (the generator's directory; only names
    `atomic_bytes` / `atomic_image` make); returns how many."""
    n = 0
    for dirpath, _, names in os.walk(out):
        for name in names:
            if _TMP.fullmatch(name):
                os.remove(os.path.join(dirpath, name))
                n += 1
    return n


def read_marker(out: str) -> dict | None:
    """The generator's marker of `out` (its seed, ...), or None when `out` is not the generator's."""
    try:
        with open(os.path.join(out, MARKER)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("generator") == GENERATOR else None


def write_marker(out: str, seed: int, **fields) -> None:
    """Mark `out` as the generator's (with its seed and any other `fields`, e.g. `written`, `complete`)."""
    m = {"generator": GENERATOR, "seed": int(seed), **fields}
    atomic_bytes(os.path.join(out, MARKER), json.dumps(m, indent=1, sort_keys=True).encode())


def update_marker(out: str, **fields) -> None:
    m = read_marker(out) or {"seed": 0}
    m.update(fields)
    m.pop("generator", None)
    write_marker(out, m.pop("seed"), **m)


def is_foreign(out: str) -> bool:
    """True when `out` exists and holds anything but is not the generator's (no marker): never write there."""
    if read_marker(out) is not None or not os.path.exists(out):
        return False
    return not os.path.isdir(out) or bool(os.listdir(out))


def claim(out: str, seed: int) -> int:
    """Make `out` the generator's (create and mark it) unless it already is; the seed of its marker.

    Raises FileExistsError when `out` holds data the generator did not write.
    """
    m = read_marker(out)
    if m is not None:
        return int(m.get("seed", 0))
    if is_foreign(out):
        raise FileExistsError(f"{out} holds data the shapes generator did not write (no {MARKER})")
    os.makedirs(out, exist_ok=True)
    write_marker(out, seed)
    return int(seed)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_index_files(out: str, files: dict[str, bytes]) -> list[str]:
    """Write the index files {path relative to `out`: bytes}: absent ones, and ones that still hold what the
    generator last wrote (so a top-up to more scenes extends them); a hand-edited file is kept (and logged).
    Returns the relative paths kept as hand edits."""
    written = dict((read_marker(out) or {}).get("written") or {})
    kept = []
    for rel, data in files.items():
        path = os.path.join(out, rel)
        if os.path.exists(path):
            with open(path, "rb") as f:
                have = sha(f.read())
            if have == sha(data):
                written[rel] = have
                continue
            if written.get(rel) != have:
                log.warning("%s: edited by hand (not what the generator wrote); kept as it is", path)
                kept.append(rel)
                continue
        atomic_bytes(path, data)
        written[rel] = sha(data)
    update_marker(out, written=dict(sorted(written.items())))
    return kept
