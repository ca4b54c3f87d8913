"""SasP + DtoC (`read_jax/sasp.py`) against a torch transcription of READ's functions
(`torchref/sasp.py`), plus hand-worked cases.

Tie policy: torch.argsort is not stable (its tie order is undefined; on CPU it visibly scrambles ties), while
`select_points` breaks ties by raster index. float32 random maps have no exact ties (checked; a map with
one would be excluded); on bf16 maps, exact ties are common, and there we require identical labels and
identical selected values in every slot, and identical points in every slot whose value is not tied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from read_jax import sasp as S
from read_jax import sasp_grid as G
from read_jax.config import SaspConfig
from tests.helpers import require_torch


@pytest.fixture(scope="module")
def torch_ref():
    torch = require_torch()
    torch.set_num_threads(1)  # 2 threads is ~10x slower on the shared CPU
    from torchref import sasp

    return torch, sasp


# Image sizes (H, W): landscape, portrait, square, odd, smaller than the grid and than 336, 1:8 extremes,
# `nw - d` odd (half-cell shift), and sizes where CPython's double rounding of int(L * (d / m)) differs
# from the exact floor (short side 307 or 47 crops the d=12/24 grid; 321 and 330 crop the 336 frame;
# (22, 55) and (15, 45) change a long-side pad).
# fmt: off
SIZES = [
    (480, 640), (375, 500), (720, 1280), (640, 480), (500, 333), (1024, 683), (336, 336), (512, 512),
    (100, 100), (333, 517), (481, 641), (227, 399), (999, 1001), (9, 13), (5, 40), (12, 12), (20, 7),
    (47, 500), (30, 31), (100, 800), (800, 100), (64, 512), (250, 2000), (480, 680), (600, 850), (307, 400),
    (400, 307), (321, 500), (330, 330), (22, 55), (15, 45), (3000, 2000), (1, 1), (2, 17),
]
# A subset for the DtoC comparisons (the transcription walks all H*W pixels per point).
DTOC_SIZES = [
    (480, 640), (640, 333), (336, 336), (307, 400), (321, 500), (330, 330), (9, 13), (5, 40),
    (100, 800), (800, 100), (47, 500), (1000, 667), (227, 399), (15, 45),
]
# fmt: on


def random_sizes(rng, n, small_fraction=0.85):
    """Random sizes, aspect ratio up to 1:8 either way; short side 1..100 px for `small_fraction` of
    them (cheap for the transcription's full-resolution DtoC), else 101..1200 px."""
    small = rng.random(n) < small_fraction
    short = np.where(small, rng.integers(1, 101, size=n), rng.integers(101, 1201, size=n))
    long_ = np.maximum(short, (short * rng.uniform(1, 8, size=n)).astype(int))
    flip = rng.random(n) < 0.5
    return [(int(b), int(a)) if f else (int(a), int(b)) for a, b, f in zip(short, long_, flip, strict=False)]


def random_maps(rng, n, g=24):
    """float32 [n, g*g]: alternating white noise, smooth blobs on noise, and uniform maps."""
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32)
    out = np.empty((n, g, g), np.float32)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out[i] = rng.normal(size=(g, g)) * 5
        elif kind == 1:
            m = rng.normal(scale=0.3, size=(g, g))
            for _ in range(rng.integers(1, 4)):
                cy, cx, s = rng.uniform(0, g), rng.uniform(0, g), rng.uniform(1.5, 5)
                m += rng.uniform(2, 6) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            out[i] = m * 10
        else:
            out[i] = rng.uniform(-20, 40, size=(g, g))
    return out.reshape(n, g * g)


@functools.cache
def jitted_select(cfg):
    return jax.jit(functools.partial(S.select_points, cfg=cfg))


@functools.cache
def jitted_sasp(cfg):
    return jax.jit(functools.partial(S.sasp, cfg=cfg))


@functools.cache
def jitted_dtoc(radius=9, similarity_dtype="bfloat16"):
    return jax.jit(functools.partial(S.dtoc, radius=radius, similarity_dtype=similarity_dtype))


def ref_select(ref, torch, sim_row, hw, cfg, dtype=None, use_dtoc=False):
    """The transcription on one map; `sim_row` a torch tensor [576] (bf16 or float32)."""
    return ref.similarity_map_to_points(
        sim_row,
        (int(hw[0]), int(hw[1])),
        down_sample=24 // cfg.grid_size,
        num_points=cfg.num_points,
        t_pos=cfg.t_pos,
        t_neg=cfg.t_neg,
        use_dtoc=use_dtoc,
        dtype=dtype or torch.float32,
        return_debug=True,
    )


def compare_selection(i, labels_j, points_j, values_j, labels_t, dbg, ties_allowed):
    """Assert one map's selection matches (see the module docstring for the tie policy)."""
    flat = dbg["padded"].reshape(-1).numpy()
    values_t = flat[dbg["selected"].numpy()]
    points_t = dbg["points_int"].numpy()
    assert labels_j.shape == labels_t.shape, f"map {i}: point counts differ"
    np.testing.assert_array_equal(labels_j, labels_t.numpy(), err_msg=f"map {i}: labels")
    np.testing.assert_array_equal(values_j, values_t, err_msg=f"map {i}: selected values")
    uniq, counts = np.unique(flat[flat >= 0], return_counts=True)
    tied = np.isin(values_t, uniq[counts > 1]) & (labels_t.numpy() != -1)
    assert ties_allowed or not tied.any()
    np.testing.assert_array_equal(points_j[~tied], points_t[~tied], err_msg=f"map {i}: integer points")


def has_ties(dbg):
    flat = dbg["padded"].reshape(-1).numpy()
    valid = flat[flat >= 0]
    return len(np.unique(valid)) < len(valid)


# ------------------------------------------------------------------------------------------------
# Geometry and resize building blocks
# ------------------------------------------------------------------------------------------------


def test_scaled_side_matches_cpython_double():
    """`scaled_side` == CPython's int(L * (d / m)) on every (m, L<=8m) with m<=250 plus random big sizes."""
    rng = np.random.default_rng(0)
    ms = [m for m in range(1, 251) for _ in range(m, 8 * m + 1)]
    ls = [length for m in range(1, 251) for length in range(m, 8 * m + 1)]
    big_m = rng.integers(251, G.MAX_SHORT_SIDE + 1, size=20000)
    ms += big_m.tolist()
    ls += (big_m * rng.uniform(1, 8, size=big_m.size)).astype(int).tolist()
    m_j, l_j = jnp.asarray(ms, jnp.int32), jnp.asarray(ls, jnp.int32)
    for d in (12, 24, 336):
        expected = np.array([int(length * (d / m)) for m, length in zip(ms, ls, strict=False)])
        got = np.asarray(jax.jit(G.scaled_side, static_argnums=2)(l_j, m_j, d))
        assert (expected != np.array(ls) * d // np.array(ms)).sum() > 50  # the rounding does bite
        np.testing.assert_array_equal(got, expected, err_msg=f"d={d}")


def test_resizes_match_torch_interpolate(torch_ref):
    torch, _ = torch_ref
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 24, 24)).astype(np.float32)
    for d in (24, 12, 8, 6, 4):  # every 24 // down_sample: bit-identical
        want = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], (d, d), mode="bilinear")[
            :, 0
        ].numpy()
        np.testing.assert_array_equal(
            np.asarray(jax.jit(G.resize_grid, static_argnums=1)(jnp.asarray(x), d)), want
        )
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], (16, 16), mode="bilinear")[
        :, 0
    ].numpy()
    np.testing.assert_allclose(np.asarray(G.resize_grid(jnp.asarray(x), 16)), want, rtol=0, atol=1e-6)
    up = G.resize_matrix(24, 336)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], (336, 336), mode="bilinear")[
        :, 0
    ].numpy()
    np.testing.assert_allclose(np.einsum("ai,nij,bj->nab", up, x, up), want, rtol=0, atol=2e-5)


def test_similarity_matches_reference(torch_ref):
    torch, ref = torch_ref
    rng = np.random.default_rng(2)
    img = rng.normal(size=(3, 576, 64)).astype(np.float32)
    seg = rng.normal(size=(3, 64)).astype(np.float32)
    for dtype, tdtype in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
        got = np.asarray(S.similarity(jnp.asarray(img), jnp.asarray(seg), dtype).astype(jnp.float32))
        it, st = torch.from_numpy(img).to(tdtype), torch.from_numpy(seg).to(tdtype)
        want = np.stack(
            [
                ref.compute_similarity_map(it[i : i + 1], st[i : i + 1])[0, :, 0].float().numpy()
                for i in range(3)
            ]
        )
        if dtype == jnp.float32:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        else:
            # bf16 products rounded, f32 accumulation, rounded: identical up to the summation order, which
            # can move a result across a bf16 rounding boundary (1 ulp) in rare cases.
            ulps = np.abs(got - want) / np.maximum(np.abs(want), 1e-30) * 2**8
            assert ulps.max() <= 1.01 and (got != want).mean() < 0.01


# ------------------------------------------------------------------------------------------------
# Point selection parity (the discrete part is compared exactly)
# ------------------------------------------------------------------------------------------------

# Appendix C (Table 8) varies t_pos/t_neg over .8/.2, .7/.3, .6/.4 and Np over 10, 30, 60: three
# configurations cover every value of both factors (each configuration is one more compile).
APPENDIX_C = [(0.8, 0.2, 10), (0.7, 0.3, 30), (0.6, 0.4, 60)]


# Full-resolution DtoC in the transcription costs ~H*W*Q*10 flops per map: it runs on the maps whose
# image has at most this many pixels (about 4/5 of the random sizes).
DTOC_MAX_PIXELS = 60_000


@pytest.mark.parametrize(
    "cfg,n_maps",
    [
        (SaspConfig.read_7b(similarity_dtype="float32"), 300),
        (SaspConfig.read_13b_eval(similarity_dtype="float32"), 300),
    ]
    + [
        (SaspConfig.read_7b(t_pos=tp, t_neg=tn, num_points=q, similarity_dtype="float32"), 60)
        for tp, tn, q in APPENDIX_C
    ]
    + [(SaspConfig(grid_size=8, num_points=30, similarity_dtype="float32"), 30)],
    ids=["7b", "13b_eval"] + [f"appC_{tp}_{tn}_{q}" for tp, tn, q in APPENDIX_C] + ["grid8"],
)
def test_parity_float32(torch_ref, cfg, n_maps):
    """Labels and integer points identical on every map; for the presets also DtoC within 1e-3 px of the
    reference's own float32 computation on every map of at most DTOC_MAX_PIXELS pixels (>= 200 maps)."""
    torch, ref = torch_ref
    presets = n_maps >= 200
    rng = np.random.default_rng(cfg.num_points * 1000 + cfg.grid_size + int(cfg.t_pos * 10))
    sizes = (SIZES + random_sizes(rng, n_maps))[:n_maps]
    sim = random_maps(rng, n_maps)
    hw = np.array(sizes, np.int32)
    pts, labels, aux = jitted_select(cfg)(jnp.asarray(sim), jnp.asarray(hw))
    cont = np.asarray(jitted_dtoc(cfg.dtoc_radius, "float32")(jnp.asarray(sim), pts, jnp.asarray(hw)))
    pts, labels, aux = (jax.tree.map(np.asarray, o) for o in (pts, labels, aux))
    excluded, dtoc_checked = 0, 0
    for i, (h, w) in enumerate(sizes):
        with_dtoc = presets and h * w <= DTOC_MAX_PIXELS
        out_t, lab_t, dbg = ref_select(ref, torch, torch.from_numpy(sim[i]), hw[i], cfg, use_dtoc=with_dtoc)
        np.testing.assert_array_equal(aux["pad"][i], dbg["pad"], err_msg=f"map {i} {sizes[i]}: padding")
        if has_ties(dbg):
            excluded += 1
            continue
        compare_selection(i, labels[i], pts[i], aux["values"][i], lab_t, dbg, ties_allowed=False)
        if with_dtoc:
            # The reference sums g * w over all H*W pixels in float32 (g up to ~1000): ~1e-4 px of its own
            # rounding error, hence the 1e-3 px here; the exact maths is checked to 1e-4 px below.
            np.testing.assert_allclose(
                cont[i], out_t.numpy(), rtol=0, atol=1e-3, err_msg=f"map {i} {sizes[i]}: DtoC"
            )
            dtoc_checked += 1
    assert excluded <= n_maps // 50
    assert not presets or dtoc_checked >= 200


@pytest.mark.parametrize("cfg", [SaspConfig.read_7b(), SaspConfig.read_13b_eval()], ids=["7b", "13b_eval"])
def test_selection_parity_bf16_from_hidden_states(torch_ref, cfg):
    """bf16 end to end from hidden states (the released dtype policy): similarity + selection."""
    torch, ref = torch_ref
    rng = np.random.default_rng(3)
    n = 60
    img = (rng.normal(size=(n, 576, 32)) + rng.normal(size=(n, 1, 32)) * 2).astype(np.float32)
    seg = rng.normal(size=(n, 32)).astype(np.float32)
    hw = np.array((SIZES + random_sizes(rng, n))[:n], np.int32)
    sim = S.similarity(jnp.asarray(img, jnp.bfloat16), jnp.asarray(seg, jnp.bfloat16))
    pts, labels, aux = (jax.tree.map(np.asarray, o) for o in jitted_select(cfg)(sim, jnp.asarray(hw)))
    it, st = torch.from_numpy(img).bfloat16(), torch.from_numpy(seg).bfloat16()
    for i in range(n):
        sim_t = ref.compute_similarity_map(it[i : i + 1], st[i : i + 1])[0, :, 0]
        if not torch.equal(sim_t.float(), torch.from_numpy(np.array(sim[i].astype(jnp.float32)))):
            continue  # a 1-ulp summation-order difference (tested above); compare from identical maps only
        _, lab_t, dbg = ref_select(ref, torch, sim_t, hw[i], cfg)
        compare_selection(i, labels[i], pts[i], aux["values"][i], lab_t, dbg, ties_allowed=True)


# ------------------------------------------------------------------------------------------------
# DtoC parity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,sizes",
    [
        (SaspConfig.read_7b(similarity_dtype="float32"), DTOC_SIZES),
        (SaspConfig.read_13b_eval(similarity_dtype="float32"), [(360, 480), (321, 500), (5, 40), (47, 500)]),
    ],
    ids=["7b", "13b_eval"],
)
def test_dtoc_exact_on_varied_geometry(torch_ref, cfg, sizes):
    """DtoC on sizes that exercise every geometry branch (crops of the 336 frame, 1:8, tiny, large)."""
    torch, ref = torch_ref
    rng = np.random.default_rng(4)
    sim = random_maps(rng, len(sizes))
    hw = np.array(sizes, np.int32)
    pts_int, labels, _ = jitted_select(cfg)(jnp.asarray(sim), jnp.asarray(hw))
    got = np.asarray(jitted_dtoc(cfg.dtoc_radius, "float32")(jnp.asarray(sim), pts_int, jnp.asarray(hw)))
    pts_int, labels = np.asarray(pts_int), np.asarray(labels)
    for i, (h, w) in enumerate(sizes):
        sim_t = torch.from_numpy(sim[i])
        # (a) The reference's float32 numerics end to end (1e-3 px: see test_parity_float32).
        p32, lab_t, dbg = ref_select(ref, torch, sim_t, (h, w), cfg, use_dtoc=True)
        np.testing.assert_array_equal(labels[i], lab_t.numpy())
        np.testing.assert_array_equal(pts_int[i], dbg["points_int"].numpy())
        np.testing.assert_allclose(
            got[i], p32.numpy(), rtol=0, atol=1e-3, err_msg=f"{(h, w)} vs float32 reference"
        )
        # (b) The same maths in float64 (full-resolution map, softmax over all pixels): the exact target.
        origin = ref.get_similarity_map(sim_t.double()[None, :, None], (h, w), torch.float64)
        p64 = ref.discrete_to_continuous(
            origin[0, ..., 0], torch.from_numpy(np.array(pts_int[i])).long()
        ).numpy()
        np.testing.assert_allclose(got[i], p64, rtol=0, atol=1e-4, err_msg=f"{(h, w)} vs float64 reference")


def test_dtoc_parity_bf16(torch_ref):
    """bf16 policy: the DtoC min-max runs in bf16 (rounded per op) exactly like the reference."""
    torch, ref = torch_ref
    cfg = SaspConfig.read_7b()
    sizes = [(240, 320), (321, 400), (47, 500)]  # (321, 400) crops the 336 frame (nh = 335)
    rng = np.random.default_rng(5)
    sim_bf = torch.from_numpy(random_maps(rng, len(sizes))).bfloat16()
    sim_j = jnp.asarray(sim_bf.float().numpy()).astype(jnp.bfloat16)
    hw = jnp.asarray(sizes, jnp.int32)
    pts_int, _, _ = jitted_select(cfg)(sim_j, hw)
    got = np.asarray(jitted_dtoc(cfg.dtoc_radius, "bfloat16")(sim_j, pts_int, hw))
    for i, (h, w) in enumerate(sizes):
        pi = torch.from_numpy(np.array(pts_int[i])).long()
        origin32 = ref.get_similarity_map(sim_bf[i][None, :, None], (h, w))  # bf16 min-max, then float32
        np.testing.assert_allclose(
            got[i], ref.discrete_to_continuous(origin32[0, ..., 0], pi).numpy(), rtol=0, atol=1e-3
        )
        origin64 = ref.get_similarity_map(
            sim_bf[i][None, :, None], (h, w), torch.float64
        )  # bf16 min-max, float64 after
        np.testing.assert_allclose(
            got[i], ref.discrete_to_continuous(origin64[0, ..., 0], pi).numpy(), rtol=0, atol=1e-4
        )


def test_dtoc_gradient_matches_torch_autograd(torch_ref):
    """d(points)/d(image_hidden, seg_hidden) through DtoC == torch autograd of the transcription (float64)."""
    torch, ref = torch_ref
    cfg = SaspConfig.read_7b(similarity_dtype="float32")
    sizes = [(48, 64), (200, 30), (321, 400)]
    rng = np.random.default_rng(6)
    n, c = len(sizes), 8
    img = rng.normal(size=(n, 576, c)).astype(np.float32)
    seg = rng.normal(size=(n, c)).astype(np.float32)
    hw = jnp.asarray(sizes, jnp.int32)
    cot = rng.normal(size=(n, cfg.num_points, 2)).astype(np.float32)

    def loss(a, b):
        points, _, aux = S.sasp(a, b, hw, cfg)
        return (points * cot).sum(), aux["points_int"]

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, pts_int), (g_img, g_seg) = grad_fn(jnp.asarray(img), jnp.asarray(seg))
    pts_int = np.asarray(pts_int)
    with torch.enable_grad():
        it = torch.from_numpy(img).double().requires_grad_(True)
        st = torch.from_numpy(seg).double().requires_grad_(True)
        total = 0.0
        for i, (h, w) in enumerate(sizes):
            sim = ref.compute_similarity_map(it[i : i + 1], st[i : i + 1])[0, :, 0]
            origin = ref.get_similarity_map(sim[None, :, None], (h, w), torch.float64)
            pts = ref.discrete_to_continuous(origin[0, ..., 0], torch.from_numpy(np.array(pts_int[i])).long())
            total = total + (pts * torch.from_numpy(cot[i]).double()).sum()
        total.backward()
    for got, want in ((np.asarray(g_img), it.grad.numpy()), (np.asarray(g_seg), st.grad.numpy())):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ------------------------------------------------------------------------------------------------
# One compile for every image size; the full pipeline; options
# ------------------------------------------------------------------------------------------------


def test_one_compile_serves_mixed_sizes():
    cfg = SaspConfig.read_7b()
    traces = []

    def fn(img, seg, hw):
        traces.append(1)  # runs only while tracing
        return S.sasp(img, seg, hw, cfg)

    fj = jax.jit(fn)
    rng = np.random.default_rng(7)
    img = jnp.asarray(rng.normal(size=(4, 576, 16)), jnp.bfloat16)
    seg = jnp.asarray(rng.normal(size=(4, 16)), jnp.bfloat16)
    batches = [
        [(480, 640), (640, 480), (9, 13), (307, 400)],
        [(100, 800), (336, 336), (1000, 667), (47, 500)],
        [(5, 40)] * 4,
    ]
    for sizes in batches:
        points, _, aux = fj(img, seg, jnp.asarray(sizes, jnp.int32))
        want_pad = [
            ((int(h * (12 / min(h, w))) - 12) // 2, (int(w * (12 / min(h, w))) - 12) // 2) for h, w in sizes
        ]
        np.testing.assert_array_equal(np.asarray(aux["pad"]), want_pad)
        assert np.isfinite(np.asarray(points)).all()
        assert (np.asarray(points)[..., 0] <= np.array(sizes)[:, None, 1] - 1).all()
        # DtoC moves points by well under a pixel (read_reference.md §3.4), but it does move them.
        shift = np.abs(np.asarray(points) - np.asarray(aux["points_int"]))
        assert 0 < shift.max() < 1
    assert len(traces) == 1 and fj._cache_size() == 1


def test_sasp_options_and_aux():
    rng = np.random.default_rng(8)
    img = jnp.asarray(rng.normal(size=(2, 576, 16)), jnp.float32)
    seg = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
    hw = jnp.asarray([(480, 640), (33, 70)], jnp.int32)
    points, labels, aux = jitted_sasp(SaspConfig.read_13b_eval(use_dtoc=False))(img, seg, hw)
    assert points.dtype == jnp.float32 and points.shape == (2, 60, 2) and labels.shape == (2, 60)
    np.testing.assert_array_equal(np.asarray(points), np.asarray(aux["points_int"]).astype(np.float32))
    assert {"sim", "grid", "cell_valid", "cells", "values", "pad", "padded_shape", "points_int"} <= set(aux)
    assert aux["sim"].dtype == jnp.bfloat16 and aux["grid"].shape == (2, 24, 24)
    np.testing.assert_array_equal(np.asarray(aux["padded_shape"]), [(24, 32), (24, 50)])  # 24 + 2 * pad


# ------------------------------------------------------------------------------------------------
# Hand-worked cases
# ------------------------------------------------------------------------------------------------


def _map(cells: dict, base=0.0):
    """A 24x24 similarity map (flattened) that is `base` except at the given (row, col) cells."""
    m = np.full((24, 24), base, np.float32)
    for (r, c), v in cells.items():
        m[r, c] = v
    return jnp.asarray(m.reshape(1, 576))


def select1(cfg, sim, hw):
    """`select_points` on one map (jitted; compiles are shared across the hand-worked tests)."""
    return jitted_select(cfg)(sim, jnp.asarray([hw], jnp.int32))


BLOB = {(11, 7): 4.0, (11, 8): 3.0, (12, 7): 2.0, (12, 8): 1.0}  # a 2x2 blob with distinct values


def test_hand_blob_7b():
    # 12x12 grid = 2x2 means: cell (5,3) = 4/4, (5,4) = 3/4, (6,3) = 2/4, (6,4) = 1/4 -> after min-max
    # 1, .75, .5, .25; 140 zeros. Image 336x504: s = 12/336, nw = 18, pw = 3, cells are 28 px wide.
    # One positive (5,3); the three others are neutral; 29 negatives, all 0: ties, raster order 0..28.
    pts, labels, aux = select1(SaspConfig.read_7b(), _map(BLOB), (336, 504))
    want = [(182, 154)]  # x = int((3 + 3 + .5) * 28), y = int((5 + .5) * 28)
    want += [(98 + 28 * c, 14) for c in range(12)] + [(98 + 28 * c, 42) for c in range(12)]
    want += [(98 + 28 * c, 70) for c in range(5)]
    np.testing.assert_array_equal(np.asarray(pts[0]), want)
    np.testing.assert_array_equal(np.asarray(labels[0]), [1] + [0] * 29)
    np.testing.assert_array_equal(np.asarray(aux["pad"][0]), [0, 3])


def test_hand_blob_13b():
    # 24x24 grid = the map / 4: (11,7) = 1, (11,8) = .75 are both >= .6 (value-descending), (12,7) = .5 and
    # (12,8) = .25 are neutral, 572 zeros. Image 336x504: nw = 36, pw = 6, cells 14 px.
    pts, labels, _ = select1(SaspConfig.read_13b_eval(), _map(BLOB), (336, 504))
    want = [(189, 161), (203, 161)]  # x = int((7 + 6 + .5) * 14), int((8 + 6 + .5) * 14); y = int(11.5 * 14)
    want += [(91 + 14 * c, 7) for c in range(24)] + [(91 + 14 * c, 21) for c in range(24)]
    want += [(91 + 14 * c, 35) for c in range(10)]
    np.testing.assert_array_equal(np.asarray(pts[0]), want)
    np.testing.assert_array_equal(np.asarray(labels[0]), [1, 1] + [0] * 58)


def test_hand_flat_map_is_finite(torch_ref):
    # Flat map: the reference's min-max divides 0 by 0 (NaN grid, nothing selected); with the epsilon
    # every cell is 0, so all are negatives in raster order. Image 480x640: nw = 16, pw = 2, 40 px cells.
    torch, ref = torch_ref
    cfg = SaspConfig.read_7b()
    sim = _map({}, base=3.0)
    pts, labels, _ = select1(cfg, sim, (480, 640))
    want = [(100 + 40 * c, 20) for c in range(12)] + [(100 + 40 * c, 60) for c in range(12)]
    want += [(100 + 40 * c, 100) for c in range(6)]
    np.testing.assert_array_equal(np.asarray(pts[0]), want)
    np.testing.assert_array_equal(np.asarray(labels[0]), [0] * 30)
    # M == 0 everywhere: DtoC is a symmetric Gaussian mean around interior points, i.e. the point itself.
    cont = np.asarray(jitted_dtoc()(sim, pts, jnp.asarray([[480, 640]], jnp.int32)))
    np.testing.assert_allclose(cont[0], np.asarray(want, np.float32), atol=1e-5)
    grid = ref.similarity_map_to_points(
        torch.full((576,), 3.0), (480, 640), use_dtoc=False, return_debug=True
    )[2]["grid"]
    assert torch.isnan(grid).all()  # the documented reference behaviour we deliberately do not copy


def test_hand_hot_cell_at_borders():
    cfg = SaspConfig.read_7b()
    # Hot 2x2 block in the top-left corner -> grid cell (0,0), value 1; image 336x504 (pw = 3, 28 px cells).
    pts, labels, _ = select1(cfg, _map({(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1}), (336, 504))
    assert (
        tuple(np.asarray(pts[0, 0])) == (98, 14)
        and int(labels[0, 0]) == 1
        and (np.asarray(labels[0, 1:]) == 0).all()
    )
    # Hot cell in the bottom-right corner of a tiny 8x10 image: s = 12/8, nh = 12, nw = 15 -> pw = 1,
    # padded grid 12 x 14. Cell (11,11) -> padded (11,12): x = 12.5 * 10/14 = 8.93 -> 8,
    # y = 11.5 * 8/12 = 7.67, clamped to H-1 = 7.
    pts, labels, _ = select1(cfg, _map({(23, 23): 1.0}), (8, 10))
    assert tuple(np.asarray(pts[0, 0])) == (8, 7) and int(labels[0, 0]) == 1
    cont = np.asarray(jitted_dtoc()(_map({(23, 23): 1.0}), pts, jnp.asarray([[8, 10]], jnp.int32)))
    assert (
        np.isfinite(cont).all()
        and (cont >= 0).all()
        and (cont[..., 0] <= 9).all()
        and (cont[..., 1] <= 7).all()
    )


def test_hand_neutrals_in_raster_order(torch_ref):
    # Map 0.5 everywhere, one 2x2 block at 1 (grid cell (2,5)) and one at 0 (grid cell (7,1)): one positive,
    # one negative, then neutrals in raster order 0..27. Square 336 image: 28 px cells, no padding.
    torch, ref = torch_ref
    cells = {(4, 10): 1, (4, 11): 1, (5, 10): 1, (5, 11): 1, (14, 2): 0, (14, 3): 0, (15, 2): 0, (15, 3): 0}
    sim, cfg = _map(cells, base=0.5), SaspConfig.read_7b()
    pts, labels, _ = select1(cfg, sim, (336, 336))
    want = (
        [(154, 70), (42, 210)]
        + [(14 + 28 * c, 14) for c in range(12)]
        + [(14 + 28 * c, 42) for c in range(12)]
    )
    want += [(14 + 28 * c, 70) for c in range(4)]
    np.testing.assert_array_equal(np.asarray(pts[0]), want)
    np.testing.assert_array_equal(np.asarray(labels[0]), [1, 0] + [-1] * 28)
    _, lab_t, dbg = ref_select(ref, torch, torch.from_numpy(np.array(sim[0])), (336, 336), cfg)
    np.testing.assert_array_equal(dbg["points_int"].numpy(), want)  # no ties in pos/neg: reference agrees
    np.testing.assert_array_equal(lab_t.numpy(), [1, 0] + [-1] * 28)


def test_hand_threshold_boundaries_are_inclusive(torch_ref):
    # 13B (24x24 grid = the map itself; min 0, max 1, so min-max is the identity). Both thresholds are
    # inclusive and compared in float32 (torch casts the python scalar): float32(0.6) is positive,
    # float32(0.2) negative, their float32 neighbours inside (0.2, 0.6) neutral.
    torch, ref = torch_ref
    cfg = SaspConfig.read_13b_eval(similarity_dtype="float32")  # bf16 would round the map values first
    after_02, before_06 = (
        np.nextafter(np.float32(0.2), np.float32(1)),
        np.nextafter(np.float32(0.6), np.float32(0)),
    )
    cells = {(0, 0): 1.0, (0, 1): 0.0, (0, 2): 0.6, (0, 3): 0.2, (0, 4): after_02, (0, 5): before_06}
    sim = _map(cells, base=0.5)
    pts, labels, aux = select1(cfg, sim, (336, 336))
    order = [0, 2, 1, 3, *range(4, 60)]  # pos 1.0, 0.6; neg 0.0, 0.2; neutrals in raster order
    np.testing.assert_array_equal(np.asarray(aux["cells"][0]), order)
    np.testing.assert_array_equal(np.asarray(labels[0]), [1, 1, 0, 0] + [-1] * 56)
    np.testing.assert_array_equal(
        np.asarray(pts[0]), [(7 + 14 * (c % 24), 7 + 14 * (c // 24)) for c in order]
    )
    _, lab_t, dbg = ref_select(ref, torch, torch.from_numpy(np.array(sim[0])), (336, 336), cfg)
    np.testing.assert_array_equal(lab_t.numpy(), np.asarray(labels[0]))
    np.testing.assert_array_equal(dbg["points_int"].numpy(), np.asarray(pts[0]))


def test_hand_topk_mode():
    # Appendix B "points only": the 3 highest and the 3 lowest cells. A ramp map makes the 12x12 grid
    # strictly increasing in raster order: highest cells 143, 142, 141, lowest 0, 1, 2 (28 px cells).
    cfg = SaspConfig(grid_size=12, num_points=6, mode="topk")
    sim = jnp.arange(576, dtype=jnp.float32)[None]
    pts, labels, _ = select1(cfg, sim, (336, 336))
    np.testing.assert_array_equal(
        np.asarray(pts[0]), [(322, 322), (294, 322), (266, 322), (14, 14), (42, 14), (70, 14)]
    )
    np.testing.assert_array_equal(np.asarray(labels[0]), [1, 1, 1, 0, 0, 0])


def test_topk_mode_random_against_numpy():
    """topk on random maps and padded/cropped sizes vs an independent numpy sort of the valid cells."""
    rng = np.random.default_rng(9)
    cfg = SaspConfig.read_7b(mode="topk", similarity_dtype="float32")
    sizes = SIZES[:20]
    sim = random_maps(rng, len(sizes))
    _, labels, aux = jitted_select(cfg)(jnp.asarray(sim), jnp.asarray(sizes, jnp.int32))
    for i in range(len(sizes)):
        grid, valid = np.asarray(aux["grid"][i]).ravel(), np.asarray(aux["cell_valid"][i]).ravel()
        idx = np.flatnonzero(valid)
        top = idx[np.argsort(-grid[idx], kind="stable")][:15]
        bottom = idx[np.argsort(grid[idx], kind="stable")][:15]
        np.testing.assert_array_equal(np.asarray(aux["cells"][i]), np.concatenate([top, bottom]))
        np.testing.assert_array_equal(np.asarray(labels[i]), [1] * 15 + [0] * 15)


# ------------------------------------------------------------------------------------------------
# Input validation: clear errors before anything is compiled
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    cfg = SaspConfig.read_7b()
    sim, hw = jnp.zeros((2, 576)), jnp.asarray([[10, 10], [20, 30]], jnp.int32)
    with pytest.raises(ValueError, match="576"):
        S.select_points(jnp.zeros((2, 500)), hw, cfg)
    with pytest.raises(ValueError, match="hw must be"):
        S.select_points(sim, hw[:1], cfg)
    with pytest.raises(ValueError, match="integer"):
        S.select_points(sim, hw.astype(jnp.float32), cfg)
    with pytest.raises(ValueError, match="short side"):
        S.select_points(sim, jnp.asarray([[0, 10], [20, 30]], jnp.int32), cfg)
    with pytest.raises(ValueError, match="short side"):
        S.dtoc(sim, jnp.zeros((2, 30, 2), jnp.int32), jnp.asarray([[20000, 20000], [20, 30]], jnp.int32))
    with pytest.raises(ValueError, match="points_int"):
        S.dtoc(sim, jnp.zeros((2, 30), jnp.int32), hw)
    with pytest.raises(ValueError, match="SaspConfig"):
        S.select_points(sim, hw, {"grid_size": 12})
    with pytest.raises(ValueError, match="grid_size"):
        S.select_points(sim, hw, SaspConfig(grid_size=32, num_points=30))
    with pytest.raises(ValueError, match="image_hidden"):
        S.sasp(jnp.zeros((2, 576, 8)), jnp.zeros((2, 9)), hw, cfg)
