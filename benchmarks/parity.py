"""Parity report: read_jax vs its PyTorch references, fp32, every model component, in one table.

The references and the weight transfers are `torchref`'s, the ones the parity tests use: HF LLaMA (MHA and
GQA), HF CLIP vision, LLaVA (HF CLIP + mlp2x_gelu + HF LLaMA), Meta's SAM (image encoder; prompt encoder +
mask decoder on READ's prompt: points, padding point, [SEG] token) and the torch READ (`torchref.read`)
end to end: logits (all, and at the supervised positions only), the [SEG] embeddings, SasP points and
labels, SAM's low-res and full-size masks. Weights go torch -> read_jax only through the real converter's
key tables (`torchref.*.build_pair`). Both sides run in fp32, with `jax_default_matmul_precision="float32"`
(no bf16 passes in XLA's dots).

  PYTHONPATH=. .venv/bin/python benchmarks/parity.py                    # every component (~1 min CPU time)
  PYTHONPATH=. .venv/bin/python benchmarks/parity.py --only llama_mha   # one component
  PYTHONPATH=. .venv/bin/python benchmarks/parity.py --save out.npz     # also every compared array

Columns: max |ref| (the scale compared), max abs error, max rel error (|got - ref| / |ref| over the
elements with |ref| >= 1e-3 max |ref| and ref != 0, so that near-zeros do not dominate), the tolerance the
parity test of that output asserts (`np.testing.assert_allclose` atol / rtol), worst/tol = max |got - ref| /
(atol + rtol |ref|) (<= 1: the test's assertion holds), for discrete outputs (SasP labels, the zeros outside
each image) the number of mismatches, and each component's seconds (build, compile, both forwards). The
last line: `parity: <k>/<n> outputs within the parity tests' tolerances; worst <x> of its tolerance
(<component/output>); SasP label mismatches: <m>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from read_jax.config import IGNORE_INDEX, ReadConfig

jax.config.update("jax_default_matmul_precision", "float32")  # fp32 like torch's CPU matmuls


@dataclasses.dataclass
class Row:
    """One compared output: got (read_jax) vs want (torch), with the tolerance its parity test asserts."""

    component: str
    output: str
    got: np.ndarray
    want: np.ndarray
    atol: float
    rtol: float
    discrete: bool = False  # compared for equality (mismatches), not within a tolerance

    @property
    def scale(self) -> float:
        return float(np.abs(self.want).max())

    @property
    def abs_err(self) -> float:
        return float(np.abs(self.got.astype(np.float64) - self.want).max())

    @property
    def rel_err(self) -> float:
        err = np.abs(self.got.astype(np.float64) - self.want)
        big = (np.abs(self.want) >= 1e-3 * self.scale) & (self.want != 0)
        return float((err[big] / np.abs(self.want[big])).max()) if big.any() else 0.0

    @property
    def mismatches(self) -> int:
        return int((self.got != self.want).sum())

    @property
    def ratio(self) -> float:
        """max |got - want| / (atol + rtol |want|); for discrete outputs the mismatch count."""
        if self.discrete:
            return float(self.mismatches)
        err = np.abs(self.got.astype(np.float64) - self.want)
        return float((err / (self.atol + self.rtol * np.abs(self.want))).max())


def _np(x) -> np.ndarray:
    return x.detach().float().numpy() if hasattr(x, "detach") else np.asarray(x)


# ---- components --------------------------------------------------------------------------------------------
def llama(kv_heads: int, name: str) -> list[Row]:
    """HF `LlamaForCausalLM` (tests/test_llama.py): logits and final-norm states on the real tokens of three
    right-padded rows. Tolerance: atol 1e-5, rtol 0."""
    import torch

    from torchref.llama import build_pair

    ref, model, cfg = build_pair(kv_heads)
    lengths, t = [12, 9, 5], 12
    rng = np.random.default_rng(1)
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = rng.integers(3, cfg.vocab_size, n), 1
    out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
    got = nnx.jit(lambda m, i, k: m(i, attention_mask=k))(model, jnp.asarray(ids), jnp.asarray(mask))
    v = mask.astype(bool)
    return [
        Row(name, "logits", _np(got.logits)[v], _np(out.logits)[v], 1e-5, 0.0),
        Row(name, "hidden (final norm)", _np(got.hidden_states)[v], _np(out.hidden_states[-1])[v], 1e-5, 0.0),
    ]


def clip() -> list[Row]:
    """HF `CLIPVisionModel` (tests/test_clip.py): the selected layer's states without CLS (LLaVA's feature),
    READ's quick_gelu / layer -2 and the HF "gelu" / last layer variant. Tolerance 1e-5 / 1e-5."""
    import torch

    from torchref.clip import build_pair

    rows = []
    for act, layer in (("quick_gelu", -2), ("gelu", -1)):
        cfg = dataclasses.replace(ReadConfig.tiny().clip, hidden_act=act, select_layer=layer)
        torch.manual_seed(0)
        ref, model = build_pair(cfg)
        pixels = torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size)
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(_np(pixels).transpose(0, 2, 3, 1)))
        rows.append(Row("clip", f"features ({act}, layer {layer})", _np(got), _np(want), 1e-5, 1e-5))
    return rows


def llava() -> list[Row]:
    """CLIP -> projector -> LLaVA merge -> HF LLaMA (tests/test_llava.py), two right-padded rows, one image
    each. Tolerance 1e-5 / 1e-5."""
    import torch

    from read_jax.config import IM_END_TOKEN_ID, IM_START_TOKEN_ID, IMAGE_TOKEN_INDEX
    from torchref.llava import build_pair, image_tokens, prepare_inputs

    cfg = ReadConfig.tiny()
    (tclip, proj, llm), model = build_pair(cfg)
    rng = np.random.default_rng(0)
    length = 12
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), bool)
    labels = np.full((2, length), IGNORE_INDEX, np.int64)
    for r, (before, after) in enumerate([(1, 3), (3, 4)]):
        txt = lambda k: rng.integers(3, 32000, k).tolist()
        row = [1, *txt(before), IM_START_TOKEN_ID, IMAGE_TOKEN_INDEX, IM_END_TOKEN_ID, *txt(after)]
        ids[r, : len(row)], mask[r, : len(row)] = row, True
        labels[r, len(row) - 3 : len(row)] = row[-3:]
    pixels = torch.randn(
        2, 3, cfg.clip.image_size, cfg.clip.image_size, generator=torch.Generator().manual_seed(1)
    )
    img = image_tokens(tclip, proj, pixels, cfg.clip.select_layer)
    t = lambda a: torch.from_numpy(a)
    embeds, _, mask_ref, _ = prepare_inputs(t(ids), llm.model.embed_tokens, img, t(labels), t(mask))
    ref = llm(inputs_embeds=embeds, attention_mask=mask_ref.long(), output_hidden_states=True)
    args = (ids, _np(pixels).transpose(0, 2, 3, 1), mask, np.arange(2), labels)
    out, merged = nnx.jit(lambda m, *a: m(*a))(model, *map(jnp.asarray, args))
    m = _np(merged.attention_mask)
    mr = _np(mask_ref).astype(bool)
    return [
        Row("llava", "merged inputs_embeds", _np(merged.inputs_embeds), _np(embeds), 1e-5, 1e-5),
        Row("llava", "logits", _np(out.logits)[m], _np(ref.logits)[mr], 1e-5, 1e-5),
        Row(
            "llava",
            "hidden (final norm)",
            _np(out.hidden_states)[m],
            _np(ref.hidden_states[-1])[mr],
            1e-5,
            1e-5,
        ),
    ]


def sam() -> list[Row]:
    """Meta SAM, the tiny READ's (tests/test_sam_image_encoder.py, test_sam_prompt_decoder.py): the image
    encoder, then READ's prompt (SasP-like points with labels 1/0/-1, the padding point, the [SEG] token)
    through the prompt encoder and the mask decoder, single- and multi-mask. Tolerance 1e-5 / 1e-5."""
    import torch

    from torchref.sam import TINY, build_pair

    cfg = TINY
    c, s = cfg.prompt_embed_dim, cfg.image_size
    ref, ours = build_pair(cfg)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, s, s, generator=gen)
    pts = torch.rand(3, 6, 2, generator=gen) * s
    lab = torch.tensor([[1, 0, -1, 1, 0, 1], [1, 1, 0, 0, -1, -1], [0, 1, 1, 1, 1, 0]])
    text = torch.randn(3, 1, c, generator=gen)
    with torch.no_grad():
        emb_ref = ref.image_encoder(images)
        sparse_ref, dense_ref = ref.prompt_encoder(points=(pts, lab), boxes=None, masks=None)
        sparse_ref = torch.cat([sparse_ref, text], dim=1)
        pe_ref = ref.prompt_encoder.get_dense_pe()
        dec_ref = {
            mm: ref.mask_decoder(emb_ref[:1], pe_ref, sparse_ref, dense_ref, multimask_output=mm)
            for mm in (False, True)
        }

    @nnx.jit
    def run(model, x, p, l, txt):
        emb = model.image_encoder(x)
        sparse, dense = model.prompt_encoder(p, l, text_embeds=txt)
        pe = model.prompt_encoder.get_dense_pe()
        dec = {mm: model.mask_decoder(emb[:1], pe, sparse, dense, mm) for mm in (False, True)}
        return emb, sparse, dense, pe, dec

    j = lambda x: jnp.asarray(_np(x)) if x.dtype.is_floating_point else jnp.asarray(x.numpy())
    emb, sparse, dense, pe, dec = run(
        ours, jnp.asarray(_np(images).transpose(0, 2, 3, 1)), j(pts), j(lab), j(text)
    )
    nhwc = lambda x: _np(x).transpose(0, 2, 3, 1)
    rows = [
        Row("sam_image_encoder", "embeddings", _np(emb), nhwc(emb_ref), 1e-5, 1e-5),
        Row("sam_prompt_encoder", "dense PE", _np(pe), nhwc(pe_ref), 1e-5, 1e-5),
        Row("sam_prompt_encoder", "sparse (points+pad+[SEG])", _np(sparse), _np(sparse_ref), 1e-5, 1e-5),
        Row("sam_prompt_encoder", "dense (no mask)", _np(dense), nhwc(dense_ref), 1e-5, 1e-5),
    ]
    for mm, name in ((False, "single"), (True, "multi")):
        rows.append(
            Row(
                "sam_mask_decoder",
                f"low-res masks ({name})",
                _np(dec[mm][0]),
                _np(dec_ref[mm][0]),
                1e-5,
                1e-5,
            )
        )
        rows.append(
            Row("sam_mask_decoder", f"IoU ({name})", _np(dec[mm][1]), _np(dec_ref[mm][1]), 1e-5, 1e-5)
        )
    return rows


def read_outputs(model, batch: dict, canvas_hw, max_supervised: int) -> dict:
    """`ReadModel`'s teacher-forced forward as flat arrays ([R, S, ...] per [SEG] slot), and the logits at
    the first `max_supervised` supervised positions (the train step's `ce_max_tokens` path)."""

    def run(m, b):
        out = m(b, canvas_hw=canvas_hw)
        return out, m.supervised_logits(out.hidden, out.labels, max_supervised)  # logits="supervised"

    out, sup = nnx.jit(run)(model, batch)
    return {
        "supervised_logits": sup.logits,
        "supervised_targets": sup.targets,
        "logits": out.logits,
        "hidden": out.hidden,
        "seg_valid": out.seg.valid,
        "pred_embeddings": out.masks.pred_embeddings,
        "points": out.masks.points,
        "point_labels": out.masks.point_labels,
        "low_res": out.masks.low_res_logits,
        "mask_logits": out.masks.mask_logits,
    }


SUPERVISED_SLOTS = 16  # K of the supervised-logits path; the batch has 13 supervised positions


def read() -> list[Row]:
    """The torch READ (`torchref.read`, tests/test_read_model.py) end to end on its 3-row batch (1, 2 and 0
    [SEG]s). Tolerances of the test: logits 1e-4 / 1e-4, [SEG] embeddings 1e-5 / 1e-5, SasP points atol
    1e-3, labels exact, masks 1e-4 / 1e-4 (final-norm states, the supervised-positions-only logits and SAM's
    low-res masks, which the test does not compare: those of logits / masks)."""
    import torch

    from torchref.read import build_pair, torch_forward
    from torchref.read_batch import CANVAS, tiny_batch, tiny_config

    cfg = tiny_config()
    tm, model = build_pair(cfg, seed=0)
    batch = tiny_batch(cfg)
    jb = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("masks", "mask_valid")}
    got = {k: _np(v) for k, v in read_outputs(model, jb, CANVAS, SUPERVISED_SLOTS).items()}
    with torch.no_grad():
        _, tout = torch_forward(cfg, tm, batch)
    # Supervised positions (t predicts label t + 1), row-major: padded with IGNORE_INDEX to the K slots.
    targets = _np(tout["labels"])[:, 1:]
    sup = targets != IGNORE_INDEX
    n_sup = int(sup.sum())
    assert 0 < n_sup <= SUPERVISED_SLOTS, n_sup
    rows = [
        Row("read", "logits", got["logits"], _np(tout["logits"]), 1e-4, 1e-4),
        Row("read", "hidden (final norm)", got["hidden"], _np(tout["hidden"]), 1e-4, 1e-4),
        Row(
            "read",
            "logits (supervised only)",
            got["supervised_logits"][:n_sup],
            _np(tout["logits"])[:, :-1][sup],
            1e-4,
            1e-4,
        ),
        Row(
            "read",
            "supervised targets",
            got["supervised_targets"],
            np.pad(targets[sup], (0, SUPERVISED_SLOTS - n_sup), constant_values=IGNORE_INDEX),
            0,
            0,
            True,
        ),
    ]
    # The k-th [SEG] of a row (torch: row-major order) is read_jax's slot k of that row.
    slots, seen = [], {}
    for t in tout["segs"]:
        slots.append((t["row"], seen.get(t["row"], 0)))
        seen[t["row"]] = slots[-1][1] + 1
    want_valid = np.zeros_like(got["seg_valid"])
    want_valid[tuple(np.array(slots).T)] = True
    if not np.array_equal(got["seg_valid"], want_valid):
        raise AssertionError(
            f"[SEG] slots: read_jax {got['seg_valid'].tolist()}, torch {want_valid.tolist()}"
        )
    pick = lambda key: np.stack([got[key][r, k] for r, k in slots])
    hw = [batch["orig_hw"][batch["conv_image"][r]] for r, _ in slots]
    inside = np.stack(
        [np.pad(np.ones(h_w, bool), [(0, CANVAS[0] - h_w[0]), (0, CANVAS[1] - h_w[1])]) for h_w in hw]
    )
    mask_ref = np.zeros((len(slots), *CANVAS), np.float32)
    for i, (s, (h, w)) in enumerate(zip(tout["segs"], hw, strict=True)):
        mask_ref[i, :h, :w] = _np(s["mask"])
    seg = lambda key: np.stack([_np(s[key]) for s in tout["segs"]])
    rows += [
        Row("read", "[SEG] embeddings", pick("pred_embeddings"), seg("pred_emb"), 1e-5, 1e-5),
        Row("read", "SasP points", pick("points"), seg("points"), 1e-3, 0.0),
        Row("read", "SasP labels", pick("point_labels"), seg("labels"), 0.0, 0.0, discrete=True),
        Row("read", "SAM low-res masks", pick("low_res"), seg("low"), 1e-4, 1e-4),
        Row("read", "masks (inside the image)", pick("mask_logits")[inside], mask_ref[inside], 1e-4, 1e-4),
        Row("read", "masks (outside: zero)", pick("mask_logits")[~inside], mask_ref[~inside], 0, 0, True),
    ]
    return rows


COMPONENTS = {
    "llama_mha": lambda: llama(4, "llama_mha"),
    "llama_gqa": lambda: llama(2, "llama_gqa"),
    "clip": clip,
    "llava": llava,
    "sam": sam,
    "read": read,
}


# ---- report ------------------------------------------------------------------------------------------------
def table(groups: list[tuple[str, float, list[Row]]]) -> str:
    """One line per output; each component's wall time (build + compile + both forwards) on its first."""
    head = (
        f"{'component':<19} {'output':<31} {'max|ref|':>8} {'max abs':>8} {'max rel':>8} {'atol/rtol':>11} "
        f"{'worst/tol':>9} {'mism.':>5} {'s':>5}"
    )
    lines = [head, "-" * len(head)]
    for _, secs, rows in groups:
        for i, r in enumerate(rows):
            tol, ratio = ("exact", "") if r.discrete else (f"{r.atol:.0e}/{r.rtol:.0e}", f"{r.ratio:.3g}")
            mism = r.mismatches if r.discrete else ""
            lines.append(
                f"{r.component:<19} {r.output:<31} {r.scale:>8.3g} {r.abs_err:>8.2e} {r.rel_err:>8.2e} "
                f"{tol:>11} {ratio:>9} {mism:>5} {f'{secs:.1f}' if i == 0 else '':>5}"
            )
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    ok = sum((r.mismatches == 0) if r.discrete else (r.ratio <= 1) for r in rows)
    worst = max((r for r in rows if not r.discrete), key=lambda r: r.ratio)
    labels = sum(r.mismatches for r in rows if r.output == "SasP labels")
    return (
        f"parity: {ok}/{len(rows)} outputs within the parity tests' tolerances; worst {worst.ratio:.3g} of "
        f"its tolerance ({worst.component}/{worst.output}); SasP label mismatches: {labels}"
    )


def main(argv=None) -> list[Row]:
    """Run the components, print the table and the summary line; returns the rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(COMPONENTS), help="components to run (default: all)")
    ap.add_argument("--save", help="also write every compared array (got / want) to this .npz")
    args = ap.parse_args(argv)
    import torch

    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    groups = []
    try:
        for name in args.only or list(COMPONENTS):
            t0 = time.perf_counter()
            rows = COMPONENTS[name]()
            groups.append((name, time.perf_counter() - t0, rows))
    finally:
        torch.set_grad_enabled(grad)
    rows = [r for _, _, g in groups for r in g]
    print(table(groups))
    if args.save:
        np.savez(
            args.save,
            **{f"{r.component}/{r.output}/{k}": getattr(r, k) for r in rows for k in ("got", "want")},
        )
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main()
