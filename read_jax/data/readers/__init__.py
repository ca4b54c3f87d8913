"""Readers for READ's training and evaluation sets, over each set's own on-disk layout, one module a source.

PyTorch reference: `rui-qian/READ@2549240` (= SESAME's loaders) `dataloaders/reason_seg_dataset.py`,
`refer_seg_dataset.py` + `refer.py`, `sem_seg_dataset.py`, `vqa_dataset.py`, `test_dataset.py`,
`data_processing.py`. Layouts: read_reference.md §9; sampling and false-premise mixing: §6.3; eval: §8.

Modules:
- `base`: `Example` / `Conversation` (what a reader yields), the `Reader` base (grain random access,
  drop counting, the train/eval modes: see its docstring), `ReaderGroup`, `SampleError`, shared constants;
- `reason_seg`: ReasonSeg and our generated shapes set (`ReasonSegReader`);
- `refer`: RefCOCO / RefCOCO+ / RefCOCOg / RefCLEF / R-RefCOCO / FP-RefCOCO (`ReferReader`, `refer_group`);
- `sem_seg`: ADE20K, COCO-Stuff, Mapillary (`LabelMapReader`), PACO-LVIS, PASCAL-Part (`CocoPartReader`),
  `sem_seg_group`; `sem_seg_classes`: the label-map class tables;
- `vqa`: LLaVA-Instruct-150k (`VqaReader`).

Every public name is re-exported here: callers use `from read_jax.data import readers as R; R.ReferReader`.
"""

from read_jax.data.readers.base import (
    MAX_CONVS,
    REASON_SEG_MODE_WEIGHTS,
    SEM_SEG_MODE_WEIGHTS,
    Conversation,
    Example,
    Reader,
    ReaderGroup,
    SampleError,
    sample_indices,
)
from read_jax.data.readers.reason_seg import ReasonSegReader
from read_jax.data.readers.refer import (
    FP_REFER_SETS,
    NEG_REFER_SETS,
    REFER_SETS,
    ReferReader,
    refer_group,
    split_by,
)
from read_jax.data.readers.sem_seg import CocoPartReader, LabelMapReader, sem_seg_group
from read_jax.data.readers.sem_seg_classes import ADE20K_CLASSES, COCO_STUFF_CLASSES
from read_jax.data.readers.vqa import VqaReader

__all__ = [
    "ADE20K_CLASSES",
    "COCO_STUFF_CLASSES",
    "FP_REFER_SETS",
    "MAX_CONVS",
    "NEG_REFER_SETS",
    "REASON_SEG_MODE_WEIGHTS",
    "REFER_SETS",
    "SEM_SEG_MODE_WEIGHTS",
    "CocoPartReader",
    "Conversation",
    "Example",
    "LabelMapReader",
    "Reader",
    "ReaderGroup",
    "ReasonSegReader",
    "ReferReader",
    "SampleError",
    "VqaReader",
    "refer_group",
    "sample_indices",
    "sem_seg_group",
    "split_by",
]
