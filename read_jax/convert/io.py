"""Reading and writing PyTorch / safetensors checkpoint files one tensor at a time.

This is the only runtime module of read_jax that imports torch, and only inside the functions that unpickle a
`.bin` / `.pth` (`torch.load(..., weights_only=True, mmap=True)`: no arbitrary code from the pickle, and the
tensor bytes stay in the file until touched). safetensors files need no torch: the JSON header is parsed here
and each tensor is read from its byte range (`readinto`, or an `np.memmap` for zero-copy views), so bf16
works through `ml_dtypes.bfloat16`.

Memory (the converter's budget is "never the whole model in host memory twice"): a memory-mapped page that
has been read counts in the process RSS until it is unmapped or advised away. `iter_tensors` therefore hands
out one tensor at a time: by default a copy read sequentially into anonymous memory, with the file pages
behind it released before the copy is yielded (`madvise(MADV_DONTNEED)` on the tensor's range of torch's
mapping for `.bin`; safetensors are never mapped). With `copy=False` it yields zero-copy views instead and
releases them (munmap / madvise) when the consumer asks for the next tensor.

Layouts handled (read_reference.md §10.1-10.3): HF `save_pretrained` directories with
`pytorch_model.bin` | `pytorch_model-0000k-of-0000n.bin` + `pytorch_model.bin.index.json` |
`model.safetensors` | `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, and single files
such as Meta's `sam_vit_h_4b8939.pth`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointFileError(ValueError):
    """A checkpoint file (or directory) that is missing, truncated, corrupt or inconsistent with its index."""


# ---- safetensors -----------------------------------------------------------------------------------------
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a safetensors file lives: absolute byte offset, dtype, shape."""

    offset: int
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header without reading any tensor data.

    Returns:
      (key -> TensorInfo with absolute file offsets, the `__metadata__` dict). Raises CheckpointFileError on a
      truncated file (data shorter than the header says) or a malformed header.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointFileError(
                f"{path}: truncated safetensors file (header of {n} bytes, file {size})"
            )
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointFileError(f"{path}: malformed safetensors header ({e})") from e
    meta = header.pop("__metadata__", None) or {}
    infos, end = {}, 0
    for key, h in header.items():
        if h.get("dtype") not in _ST_DTYPES:
            raise CheckpointFileError(f"{path}: tensor {key!r} has unsupported dtype {h.get('dtype')!r}")
        dt, shape = _ST_DTYPES[h["dtype"]], tuple(int(s) for s in h["shape"])
        b, e = (int(x) for x in h["data_offsets"])
        if e - b != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise CheckpointFileError(f"{path}: tensor {key!r}: {e - b} bytes for shape {shape} {h['dtype']}")
        infos[key] = TensorInfo(8 + n + b, e - b, dt, shape)
        end = max(end, e)
    if 8 + n + end > size:
        raise CheckpointFileError(
            f"{path}: truncated safetensors file: tensors end at byte {8 + n + end}, the file has {size}"
        )
    return infos, meta


def _iter_safetensors(path: Path, copy: bool) -> Iterator[tuple[str, np.ndarray]]:
    infos, _ = read_safetensors_header(path)
    with open(path, "rb") as f:
        # File order: sequential reads, and the kernel's readahead helps.
        for key, info in sorted(infos.items(), key=lambda kv: kv[1].offset):
            if info.nbytes == 0:
                yield key, np.zeros(info.shape, info.dtype)
            elif copy:
                # Straight into anonymous memory: no file pages are ever mapped into the process.
                arr = np.empty(info.shape, info.dtype)
                f.seek(info.offset)
                if f.readinto(memoryview(arr.reshape(-1).view(np.uint8))) != info.nbytes:
                    raise CheckpointFileError(f"{path}: truncated while reading {key!r}")
                yield key, arr
            else:
                arr = np.memmap(path, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)
                yield key, arr
                # Unmapping drops this tensor's pages from our RSS (they stay in the page cache, not in the
                # process).
                arr._mmap.close()  # type: ignore[attr-defined]
                del arr


def safetensors_layout(
    specs: Sequence[tuple[str, Sequence[int], Any]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, int], int]:
    """The header of a safetensors file holding `specs` = [(key, shape, dtype)] in that order.

    Returns (the 8-byte length + JSON header bytes, key -> absolute byte offset of its data, file size).
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    rel, off = {}, 0
    for key, shape, dtype in specs:
        dt = np.dtype(dtype)
        if dt not in _ST_NAMES:
            raise CheckpointFileError(f"cannot write {key!r} of dtype {dt} to safetensors")
        nb = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[key] = {
            "dtype": _ST_NAMES[dt],
            "shape": [int(x) for x in shape],
            "data_offsets": [off, off + nb],
        }
        rel[key] = off
        off += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces
    head = struct.pack("<Q", len(raw)) + raw
    return head, {k: len(head) + v for k, v in rel.items()}, len(head) + off


class SafetensorsWriter:
    """A safetensors file laid out up front from (key, shape, dtype) specs, then filled tensor by tensor in
    any order (each `write` seeks to its slot), so a writer never holds more than the tensor it is given."""

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[tuple[str, Sequence[int], Any]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self.specs = {k: (tuple(int(x) for x in s), np.dtype(d)) for k, s, d in specs}
        head, self.offsets, size = safetensors_layout(specs, metadata)
        self.pending = set(self.specs)
        with open(self.path, "wb") as f:
            f.write(head)
            f.truncate(size)

    def write(self, key: str, a: np.ndarray) -> None:
        shape, dt = self.specs[key]
        if tuple(a.shape) != shape or np.dtype(a.dtype) != dt:
            raise CheckpointFileError(
                f"{self.path}: {key!r} is {a.shape} {a.dtype}, the header says {shape} {dt}"
            )
        with open(self.path, "r+b") as f:
            f.seek(self.offsets[key])
            f.write(np.ascontiguousarray(a).tobytes(order="C"))
        self.pending.discard(key)

    def close(self) -> None:
        if self.pending:
            raise CheckpointFileError(f"{self.path}: tensors never written: {sorted(self.pending)}")


def write_safetensors(
    path: str | os.PathLike,
    items: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write (key, array) pairs to one safetensors file (bf16 arrays as BF16); loadable by
    `safetensors.torch.load_file` and transformers (which also wants `metadata={"format": "pt"}`)."""
    items = list(items.items() if isinstance(items, Mapping) else items)
    w = SafetensorsWriter(path, [(k, a.shape, a.dtype) for k, a in items], metadata)
    for k, a in items:
        w.write(k, a)
    w.close()


# ---- torch pickles (.bin / .pth) ---------------------------------------------------------------------------
_MADV_DONTNEED = 4
_libc = None


def _drop_pages(addr: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) on [addr, addr + nbytes): evict a read-only file mapping's pages from RSS."""
    global _libc
    if nbytes <= 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    start = addr & ~(mmap.PAGESIZE - 1)
    # Whole pages only: the partial pages at either end may be shared with the neighbouring tensors, which is
    # harmless for a read-only file mapping (they are re-read from the page cache if touched again).
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(addr + nbytes - start), _MADV_DONTNEED)


_COPY_CHUNK = 16 << 20
_ZIP_MAGIC = b"PK\x03\x04"
_LFS_POINTER = b"version https://git-lfs"


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The informative line of an exception (torch's weights_only refusals span a dozen lines)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    line = m.group(1) if m else next((x.strip() for x in text.splitlines() if x.strip()), type(e).__name__)
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_weights_file(path: str | os.PathLike) -> str:
    """'zip' (torch.save), 'pickle' (legacy torch.save) or 'safetensors', from the file's first bytes.

    Raises CheckpointFileError (one line, naming the file) for anything else: an empty file, a Git LFS
    pointer instead of the weights, text or other formats given where a checkpoint is expected.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_LFS_POINTER):
        raise CheckpointFileError(
            f"{path}: a Git LFS pointer, not the weights: fetch the file itself (git lfs pull)"
        )
    if path.suffix == ".safetensors":
        return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode: a pickle
        return "pickle"
    what = "an empty file" if not head else f"a file starting with {head[:16]!r}"
    raise CheckpointFileError(
        f"{path}: not a PyTorch checkpoint ({what}; torch.save writes a zip archive or a pickle): check that "
        "it is the right file and completely downloaded"
    )


def _torch_load(path: Path) -> tuple[dict, bool]:
    """(state dict, whether its storages are memory-mapped from the file)."""
    import pickle

    import torch  # the only runtime torch import: reading pickles needs it

    kind = check_weights_file(path)
    try:
        if kind == "zip":
            obj, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        else:  # legacy (pre-zipfile) pickles cannot be memory-mapped: read whole, they are small (< 2 GB era)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the error below says it all
                obj, mapped = torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as e:
        old = " old-format (pre-zip)" if kind == "pickle" else ""
        raise CheckpointFileError(
            f"{path}: torch's safe loader (weights_only=True) cannot read this{old} file ({_one_line(e)}). "
            "read_jax never unpickles with weights_only=False, which can run code from the file: if you "
            "trust it, re-save it with a current torch (torch.save(torch.load(f, weights_only=False), f)) "
            "or as safetensors"
        ) from e
    except RuntimeError as e:
        if any(s in str(e) for s in ("zip archive", "central directory", "PytorchStreamReader")):
            # The zip index is at the end of a torch.save file: a truncated download loses it first.
            raise CheckpointFileError(
                f"{path}: cannot read the checkpoint (truncated or corrupt file: {_one_line(e)}); "
                "download it again"
            ) from e
        raise CheckpointFileError(f"{path}: cannot read the checkpoint ({_one_line(e)})") from e
    except Exception as e:  # EOFError, KeyError, ... from a damaged legacy pickle
        raise CheckpointFileError(
            f"{path}: cannot read the checkpoint ({type(e).__name__}: {_one_line(e)}); the file is "
            "damaged or not a torch state dict"
        ) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointFileError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return dict(obj), mapped


# ---- zip CRC-32 checks (torch's memory-mapped load reads tensor bytes without checking them) -------------
def _zip_records(path: Path) -> tuple[dict[int, zipfile.ZipInfo], list[zipfile.ZipInfo]]:
    """(data offset -> ZipInfo of every tensor-storage record, the other records). The small records (the
    pickle, version, byte order) are read and CRC-checked here."""
    data, other = {}, []
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointFileError(
                        f"{path}: record {info.filename} is compressed (not torch.save)"
                    )
                if "/data/" in info.filename and info.file_size:
                    f.seek(info.header_offset + 26)
                    n, m = struct.unpack("<HH", f.read(4))
                    data[info.header_offset + 30 + n + m] = info
                else:
                    other.append(info)
                    zf.read(info)  # raises BadZipFile on a CRC mismatch
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointFileError(f"{path}: corrupt zip archive ({_one_line(e)}); download it again") from e
    return data, other


def _verify_zip(path: Path) -> None:
    """Read every record through zipfile, which checks each CRC-32 (the slow path, a second read)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as r:
                    while r.read(_COPY_CHUNK):
                        pass
    except zipfile.BadZipFile as e:
        raise CheckpointFileError(f"{path}: corrupt file ({_one_line(e)}); download it again") from e


class _StorageCrcs:
    """The archive's CRC-32 of each memory-mapped storage of a torch.save zip, by storage address.

    torch maps the whole file and each storage is the slice at its record's data offset, so sorted storage
    addresses and sorted record offsets differ by one constant. When they do not line up (an unexpected
    layout) the archive is verified through zipfile instead, before any tensor is handed out.
    """

    def __init__(self, path: Path, sd: Mapping[str, Any]):
        self.path = path
        records, _ = _zip_records(path)
        tensors = [t for t in sd.values() if hasattr(t, "untyped_storage")]
        storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
        storages = sorted((p, n) for p, n in storages if n)
        offsets = sorted(records)
        self.crc: dict[int, tuple[int, str]] = {}
        if len(storages) == len(offsets) and storages:
            base = storages[0][0] - offsets[0]
            if all(p - o == base and n == records[o].file_size for (p, n), o in zip(storages, offsets)):
                self.crc = {p: (records[o].CRC, records[o].filename) for (p, _), o in zip(storages, offsets)}
        if not self.crc and storages:
            _verify_zip(path)
        self.checked: set[int] = set()

    def check(self, key: str, ptr: int, nbytes: int, crc: int | None = None) -> None:
        """Check the storage at `ptr` once (`crc`: already computed by the caller over exactly it)."""
        if ptr in self.checked or ptr not in self.crc:
            return
        if crc is None:
            crc = 0
            view = memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B")
            for i in range(0, nbytes, _COPY_CHUNK):
                crc = zlib.crc32(view[i : i + _COPY_CHUNK], crc)
        want, record = self.crc[ptr]
        if crc != want:
            raise CheckpointFileError(
                f"{self.path}: the bytes of {key!r} do not match the archive's CRC-32 (record {record}): the "
                "file is corrupt; download it again"
            )
        self.checked.add(ptr)


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as a numpy array sharing its memory (bf16 through ml_dtypes, no float32 detour)."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _copy_dropping_pages(src: np.ndarray) -> tuple[np.ndarray, int]:
    """Copy a C-contiguous view of a file mapping in one sequential pass (readahead-friendly; a transpose
    straight from the mapping would fault pages in a strided order), releasing each 16 MiB of file pages as
    soon as it is copied, so a tensor is never resident twice. Returns (the copy, CRC-32 of its bytes)."""
    out = np.empty(src.shape, src.dtype)
    s, d = src.reshape(-1).view(np.uint8), out.reshape(-1).view(np.uint8)
    base = src.__array_interface__["data"][0]
    crc = 0
    for i in range(0, s.size, _COPY_CHUNK):
        j = min(i + _COPY_CHUNK, s.size)
        d[i:j] = s[i:j]
        crc = zlib.crc32(d[i:j], crc)
        _drop_pages(base + i, j - i)
    return out, crc


def _iter_torch(path: Path, copy: bool) -> Iterator[tuple[str, np.ndarray]]:
    sd, mapped = _torch_load(path)
    crcs = _StorageCrcs(path, sd) if mapped else None  # legacy pickles carry no checksums
    for key in list(sd):
        t = sd.pop(key)
        if not hasattr(t, "untyped_storage"):
            raise CheckpointFileError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
        arr = torch_to_numpy(t)
        st = t.untyped_storage()
        whole = t.is_contiguous() and t.data_ptr() == st.data_ptr() and t.nbytes == st.nbytes()
        crc = None
        if copy and mapped and t.is_contiguous():
            arr, crc = _copy_dropping_pages(arr)
        elif copy:
            arr = np.array(arr, copy=True, order="C")
        if crcs is not None:
            crcs.check(key, st.data_ptr(), st.nbytes(), crc if whole else None)
        if not copy:
            yield key, arr
        if mapped:
            # Only for file mappings: on anonymous memory MADV_DONTNEED would zero the pages (and a storage
            # can be shared by several keys, e.g. tied weights).
            n = t.numel() * t.element_size() if t.is_contiguous() else st.nbytes()
            _drop_pages(t.data_ptr() if t.is_contiguous() else st.data_ptr(), n)
        del t, st
        if copy:
            yield key, arr
        del arr


def iter_tensors(path: str | os.PathLike, *, copy: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) for every tensor of one checkpoint file, one at a time.

    `.safetensors` is read without torch; anything else (`.bin`, `.pth`, `.pt`) with
    `torch.load(weights_only=True, mmap=True)`.

    Args:
      copy: True (default): each array is read sequentially into memory the consumer owns, and the file pages
        behind it are released before it is yielded, so resident memory is one tensor at a time. False:
        zero-copy views of the file mapping, valid only until the next item is requested.
    """
    path = Path(path)
    if check_weights_file(path) == "safetensors":
        yield from _iter_safetensors(path, copy)
    else:
        yield from _iter_torch(path, copy)


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A whole (small) checkpoint file as owned numpy arrays, e.g. a CLIP or SAM state dict in tests."""
    return dict(iter_tensors(path))


def tensor_keys(path: str | os.PathLike) -> list[str] | None:
    """The keys of a file without reading its tensors, when the format allows it (safetensors); else None."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return list(read_safetensors_header(path)[0])
    return None


# ---- HF directories ----------------------------------------------------------------------------------------
_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
    """The weight files of a HF `save_pretrained` directory, in shard order.

    weight_map: key -> file name from the index json (None for a single unindexed file).
    """

    directory: Path
    files: tuple[Path, ...]
    weight_map: dict[str, str] | None

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def keys_of(self, file: Path) -> set[str] | None:
        if self.weight_map is None:
            return None
        return {k for k, v in self.weight_map.items() if v == file.name}


def find_checkpoint_files(directory: str | os.PathLike) -> CheckpointFiles:
    """Locate the weight shards of a HF directory (safetensors preferred, as transformers does).

    Raises CheckpointFileError naming the missing file(s) when the index lists shards that are absent.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointFileError(f"{d}: not a directory")
    for name in _INDEX_NAMES:
        index = d / name
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointFileError(f"{index}: not a valid index json ({e})") from e
            names = sorted(set(wm.values()))
            missing = [n for n in names if not (d / n).is_file()]
            if missing:
                raise CheckpointFileError(f"{index} lists shard(s) that are missing from {d}: {missing}")
            return CheckpointFiles(d, tuple(d / n for n in names), dict(wm))
    for name in _SINGLE_NAMES:
        if (d / name).is_file():
            return CheckpointFiles(d, (d / name,), None)
    shards = sorted(d.glob("pytorch_model-*.bin")) + sorted(d.glob("model-*.safetensors"))
    if shards:
        raise CheckpointFileError(
            f"{d}: found shards {[s.name for s in shards]} but no index json "
            f"(expected one of {list(_INDEX_NAMES)})"
        )
    raise CheckpointFileError(f"{d}: no weights found (expected {list(_SINGLE_NAMES)} or an index json)")
