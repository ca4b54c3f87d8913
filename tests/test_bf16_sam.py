"""bf16 parity of SAM: read_jax in bf16 vs Meta's `segment_anything` in bf16 and fp32, same weights
(`torchref.bf16.sam_models`, where the reference's bf16 numerics and the depths are described)."""

import jax.numpy as jnp
import pytest

from tests.bf16 import check
from tests.helpers import require_meta_sam, require_torch


@pytest.fixture(scope="module")
def models():
    require_torch()
    require_meta_sam()
    from torchref.bf16 import sam_models

    return sam_models()


def test_bf16_sam_image_embeddings(models):
    from torchref.bf16 import sam_embeddings_output, sam_embeddings_run

    run = sam_embeddings_run(models)
    assert run["got"].dtype == jnp.bfloat16
    check(sam_embeddings_output(run))


def test_bf16_sam_mask_logits_from_the_same_prompts(models):
    """Prompt encoder + mask decoder from the reference's bf16 embedding and the same SasP-like prompts; the
    low-res logits leave the decoder in bf16 and are cast to fp32, as READ's postprocessing does."""
    from torchref.bf16 import sam_mask_logits_output, sam_mask_logits_run

    run = sam_mask_logits_run(models)
    assert run["low"].dtype == jnp.bfloat16 and run["masks"].dtype == jnp.float32
    check(sam_mask_logits_output(run))
