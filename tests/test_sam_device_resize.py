"""SAM's resize on the device: PIL's bilinear resize, bit for bit, from the pipeline's unresized frames.

The reference resizes with PIL (`ResizeLongestSide.apply_image`); the data pipeline ships an image that fits
in SAM's frame unresized with PIL's coefficient tables (`preprocess.sam_resize_tables`), and the model
resizes it (`preprocess.apply_resize_tables`). The truth here is PIL itself (`Image.resize(BILINEAR)`).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from read_jax.config import ReadConfig
from read_jax.data import make_shapes
from read_jax.data import pipeline as P
from read_jax.data import preprocess as pp
from read_jax.data import readers as R
from read_jax.sam import transforms
from read_jax.sam.transforms import get_preprocess_shape

TOKENIZER = os.path.join(os.path.dirname(__file__), "assets", "tokenizer")


def _pil_frame(image: np.ndarray, s: int) -> np.ndarray:
    """PIL's longest-side resize, top-left in a zero S x S frame: what the device must produce."""
    h, w = get_preprocess_shape(*image.shape[:2], s)
    out = np.zeros((s, s, 3), np.uint8)
    out[:h, :w] = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    return out


def _case(rng, h, w, s):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    frame = np.zeros((s, s, 3), np.uint8)
    frame[:h, :w] = image
    return frame, pp.sam_resize_tables((h, w), get_preprocess_shape(h, w, s), s), _pil_frame(image, s)


def test_device_resize_is_pils_bit_for_bit():
    """300 random sizes in a 64 frame (1 x 1 up to the frame, thin strips, equal size) in one jitted call,
    and the same through numpy."""
    s, rng = 64, np.random.default_rng(0)
    sizes = [(1, 1), (1, s), (s, 1), (s, s), (s - 1, s), (17, 5), (2, 3), (33, s)]
    sizes += [tuple(int(v) for v in rng.integers(1, s + 1, 2)) for _ in range(292)]
    frames, tables, want = map(np.stack, zip(*(_case(rng, h, w, s) for h, w in sizes), strict=True))
    got = np.asarray(jax.jit(pp.apply_resize_tables)(jnp.asarray(frames), jnp.asarray(tables)))
    bad = [sizes[i] for i in np.flatnonzero((got != want).any(axis=(1, 2, 3)))]
    assert not bad, f"device resize differs from PIL for sizes {bad[:10]}"
    np.testing.assert_array_equal(pp.apply_resize_tables(frames, tables, np), want)


@pytest.mark.parametrize("hw", [(270, 360), (480, 640), (1023, 1024), (700, 333)])
def test_device_resize_at_sam_size(hw):
    """SAM-H's 1024 frame: the shapes set's and COCO's sizes (upscales), one pixel short, a portrait."""
    frame, table, want = _case(np.random.default_rng(1), *hw, 1024)
    np.testing.assert_array_equal(pp.apply_resize_tables(frame, table, np), want)


def test_identity_tables_keep_the_frame():
    frame = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        pp.apply_resize_tables(frame, pp.sam_resize_tables((32, 32), (32, 32), 32), np), frame
    )
    with pytest.raises(ValueError, match="upscale or equal"):
        pp.sam_resize_tables((40, 10), (20, 10), 64)  # a downscale stays on the host


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    make_shapes.write_split(out, "train", 3, seed=4)
    return out


@pytest.mark.parametrize("side", [512, 256], ids=["fits: device resize", "larger: host resize"])
def test_pipeline_frames_resize_to_sams_preprocess(shapes_dir, side):
    """The pipeline's SAM frame + tables resize to exactly what the reference's preprocessing gives, and
    normalise (on the device) to `transforms.preprocess`'s floats; with `sam_device_resize=False` the frame
    is already that (the path before). The shapes image fits a 512 frame (shipped unresized) and not a 256
    one (resized on the host)."""
    sam = dataclasses.replace(ReadConfig.tiny().sam, image_size=side)
    cfg = P.DataConfig(batch_size=1, max_convs=3, max_mask_side=512, length_buckets=(128,))
    reader = R.ReasonSegReader(shapes_dir, "train")
    ex = reader.example(0, np.random.default_rng(0))
    image = pp.load_image(ex.image_path)
    h, w = image.shape[:2]
    assert 256 < max(h, w) <= 512
    on, off = (
        P.Collate(c, sam)([P.ExampleProcessor(c, sam, TOKENIZER)(ex)])
        for c in (cfg, dataclasses.replace(cfg, sam_device_resize=False))
    )
    want, hw = transforms.preprocess(image, sam)
    np.testing.assert_array_equal(on["sam_input_hw"][0], hw)
    shipped = on["images_sam"][0]
    if side == 512:  # the original, unresized
        np.testing.assert_array_equal(shipped[:h, :w], image)
        assert not shipped[h:].any() and not shipped[:, w:].any()
    assert "sam_resize" not in off  # everything resized on the host: the model resizes nothing
    resized = jax.jit(pp.apply_resize_tables)(jnp.asarray(on["images_sam"]), jnp.asarray(on["sam_resize"]))
    np.testing.assert_array_equal(np.asarray(resized), off["images_sam"])
    got = pp.sam_normalize(resized, jnp.asarray(on["sam_input_hw"]), sam.pixel_mean, sam.pixel_std)
    np.testing.assert_array_equal(np.asarray(got)[0], want)


def test_model_resizes_the_pipelines_frames():
    """`ReadModel.image_embeddings` applies the tables: the unresized frame + tables give the embeddings of
    the host-resized frame, bit for bit (the smoke model's SAM encoder)."""
    from flax import nnx

    from read_jax.read_model import ReadModel
    from tests.helpers import numpy_random_model

    cfg = ReadConfig.smoke()
    s = cfg.sam.image_size
    model = numpy_random_model(lambda: ReadModel(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(3)
    cases = [_case(rng, h, w, s) for h, w in ((s // 2, s // 3), (s, s - 5))]
    frames, tables, resized = (jnp.asarray(np.stack(x)) for x in zip(*cases, strict=True))
    hw = jnp.asarray([get_preprocess_shape(s // 2, s // 3, s), get_preprocess_shape(s, s - 5, s)], jnp.int32)
    emb = nnx.jit(lambda m, *a: m.image_embeddings(*a))
    np.testing.assert_array_equal(
        np.asarray(emb(model, frames, hw, tables)), np.asarray(emb(model, resized, hw))
    )


def test_run_config_auto_keeps_the_resize_on_the_host_on_a_cpu():
    """`data.sam_device_resize="auto"` (the default): the device on GPUs/TPUs, the host on a CPU (XLA:CPU's
    gathers are slower than PIL there); an explicit value wins; anything else is refused."""
    from read_jax.config import ConfigError
    from read_jax.data import loaders
    from read_jax.train import config as run_config

    c = run_config.default_config()
    cfg = ReadConfig.smoke()
    assert c.data.sam_device_resize == "auto" and jax.default_backend() == "cpu"
    assert loaders.data_config(c.data, cfg).sam_device_resize is False
    data = c.data.to_dict()
    assert loaders.data_config({**data, "sam_device_resize": True}, cfg).sam_device_resize is True
    assert loaders.data_config({**data, "sam_device_resize": "True"}, cfg).sam_device_resize is True  # CLI
    with pytest.raises(ConfigError, match="sam_device_resize"):
        loaders.data_config({**data, "sam_device_resize": "yes"}, cfg)
