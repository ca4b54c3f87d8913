"""The shapes world as READ's whole data mix: every source READ trains on, generated from one scene
generator and written at its real on-disk path, in its real format, so that the real readers read it
(`mixture.build_reference_sources(root, SOURCES, sub_datasets=SUB_DATASETS)`, `loaders.eval_reader`).

Modules: `scene` (the scenes: geometry, rendering, `random_scene`), `reason` (ReasonSeg queries with false
premises, `query_kind`), `refer` (RefCOCO-family expressions, negatives, false premises), `semseg` (Mapillary
and PACO-LVIS layouts), `vqa` (LLaVA-Instruct conversations, `vqa_kind`, `vqa_key`), `files` (atomic writes,
the generator's marker), `write` (the pools, their streams and `write_mix`). The command is
`python -m read_jax.data.make_shapes`.
"""

from read_jax.data.shapes.files import MARKER, is_foreign, read_marker, write_marker
from read_jax.data.shapes.reason import (
    QUERY_KIND_PATTERNS,
    example_paths,
    make_example,
    query_kind,
    write_example,
    write_split,
)
from read_jax.data.shapes.scene import COLORS, SHAPES, SPLITS, random_scene
from read_jax.data.shapes.vqa import VQA_KINDS, vqa_key, vqa_kind
from read_jax.data.shapes.write import (
    SOURCES,
    STREAMS,
    SUB_DATASETS,
    default_reason_seg_dir,
    parse_train_of,
    scene_of,
    vqa_paths,
    write_mix,
)

__all__ = [
    "COLORS",
    "MARKER",
    "QUERY_KIND_PATTERNS",
    "SHAPES",
    "SOURCES",
    "SPLITS",
    "STREAMS",
    "SUB_DATASETS",
    "VQA_KINDS",
    "default_reason_seg_dir",
    "example_paths",
    "is_foreign",
    "make_example",
    "parse_train_of",
    "query_kind",
    "random_scene",
    "read_marker",
    "scene_of",
    "vqa_key",
    "vqa_kind",
    "vqa_paths",
    "write_example",
    "write_marker",
    "write_mix",
    "write_split",
]
