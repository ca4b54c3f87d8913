"""Metrics on hand-made masks with the expected gIoU/cIoU worked out by hand in the comments."""

import numpy as np
import pytest

from read_jax.metrics import IoUMeter, intersection_union, query_iou, see_accuracy


def _masks():
    # Query 1: 4x4, GT has a 2x2 block and one ignore (255) pixel where the prediction is also on.
    gt1 = np.zeros((4, 4), np.uint8)
    gt1[0:2, 0:2] = 1
    gt1[3, 3] = 255
    pr1 = np.zeros((4, 4), np.uint8)
    pr1[0:2, 0:3] = 1  # 6 pixels: 4 on GT, 2 false positives
    pr1[3, 3] = 1  # on an ignore pixel: not counted anywhere
    # I = 4, U = 6 + 4 - 4 = 6.
    # Query 2: empty GT, empty prediction: I = U = 0, IoU counts 1.0.
    gt2 = np.zeros((4, 4), np.uint8)
    pr2 = np.zeros((4, 4), np.uint8)
    # Query 3: empty GT (false premise), 3 predicted pixels: I = 0, U = 3, IoU 0.
    gt3 = np.zeros((4, 4), np.uint8)
    pr3 = np.zeros((4, 4), np.uint8)
    pr3[2, 0:3] = 1
    # Query 4: GT 5 pixels, prediction misses entirely: I = 0, U = 5.
    gt4 = np.zeros((4, 4), np.uint8)
    gt4[3, 0:4] = 1
    gt4[2, 3] = 1
    pr4 = np.zeros((4, 4), np.uint8)
    return np.stack([pr1, pr2, pr3, pr4]), np.stack([gt1, gt2, gt3, gt4])


def test_intersection_union_hand_made():
    pred, gt = _masks()
    inter, union = intersection_union(pred, gt)
    np.testing.assert_array_equal(inter, [4, 0, 0, 0])
    np.testing.assert_array_equal(union, [6, 0, 3, 5])


def test_intersection_union_jax_matches_numpy_and_respects_canvas_validity():
    import jax.numpy as jnp

    pred, gt = _masks()
    valid = np.ones_like(gt, bool)
    valid[:, :, 3] = False  # drop the last column: query 1 loses nothing of I, query 4 loses 2 GT pixels
    i_np, u_np = intersection_union(pred, gt, valid)
    i_j, u_j = intersection_union(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(valid))
    np.testing.assert_array_equal(i_np, np.asarray(i_j))
    np.testing.assert_array_equal(u_np, np.asarray(u_j))
    # Query 1 without column 3: pred has 4 on GT + 1 FP at (0..1, 2) = 2 FPs -> U = 6; query 4: GT 3 px.
    np.testing.assert_array_equal(u_np, [6, 0, 3, 3])


def test_giou_ciou_hand_made():
    pred, gt = _masks()
    inter, union = intersection_union(pred, gt)
    m = IoUMeter()
    m.update(inter, union)
    # gIoU = mean(4/(6+1e-5), 1.0, 0, 0); cIoU = 4 / (6 + 0 + 3 + 5) = 4/14.
    assert m.giou == pytest.approx((4 / (6 + 1e-5) + 1.0) / 4, rel=1e-12)
    assert m.ciou == pytest.approx(4 / 14, rel=1e-9)
    assert m.count == 4


def test_meter_merge_equals_single_pass_and_validity_drops_padding():
    pred, gt = _masks()
    inter, union = intersection_union(pred, gt)
    a, b, whole = IoUMeter(), IoUMeter(), IoUMeter()
    a.update(inter[:1], union[:1])
    b.update(np.r_[inter[1:], 99], np.r_[union[1:], 7], valid=[True, True, True, False])  # padded sample
    whole.update(inter, union)
    merged = a.merge(b)
    assert merged == whole


def test_query_iou_empty_vs_empty_is_one():
    np.testing.assert_allclose(query_iou([0, 2], [0, 4]), [1.0, 2 / (4 + 1e-5)])


def test_see_accuracy():
    assert see_accuracy([True, False, True, False], [True, False, False, True]) == 0.5
