"""The collate's shared-memory arrays (grain workers hand them to the main process by name) are made only
where grain frees them: in a worker's batch, never by `loaders.batch_spec` in the main process, whose
segments nothing would unlink (they leaked until exit: 24 segments in one `benchmarks/memory.py --part plan`).
"""

import numpy as np
from grain import multiprocessing as gmp

from read_jax.config import ReadConfig
from read_jax.data import loaders
from read_jax.data import pipeline as P

SAM = ReadConfig.smoke().sam
SHARED = gmp.SharedMemoryArray


def _config(workers: int) -> P.DataConfig:
    return P.DataConfig(
        batch_size=2, max_convs=3, max_mask_side=64, length_buckets=(32,), num_workers=workers
    )


def _count_shared(monkeypatch) -> list:
    made = []

    def counting(shape, dtype):
        made.append(shape)
        return SHARED(shape, dtype)

    monkeypatch.setattr(gmp, "SharedMemoryArray", counting)
    monkeypatch.setattr(P.Collate, "shared_min_bytes", 0)  # the smoke arrays are small
    return made


def test_collate_with_workers_uses_shared_memory(monkeypatch):
    made = _count_shared(monkeypatch)
    batch = P.Collate(_config(2), SAM)([])
    try:
        assert {n for n, x in batch.items() if isinstance(x, SHARED)} == {
            "images_clip",
            "images_sam",
            "masks",
        }
        assert len(made) == 3
        plain = P.Collate(_config(0), SAM)([])
        for n, x in batch.items():
            assert x.shape == plain[n].shape and x.dtype == plain[n].dtype, n
            if x.dtype != object:
                np.testing.assert_array_equal(x, plain[n])
    finally:
        for x in batch.values():
            if isinstance(x, SHARED):
                x.unlink_on_del()
        del batch


def test_batch_spec_allocates_no_shared_memory(monkeypatch):
    made = _count_shared(monkeypatch)
    spec = loaders.batch_spec(_config(2), SAM, 32, accum=2)
    assert made == []
    assert spec == loaders.batch_spec(_config(0), SAM, 32, accum=2)
    assert spec["images_sam"].shape[:2] == (2, 2) and spec["input_ids"].shape == (2, 6, 32)
