"""Hessian products over kept first-order graphs (issue 11 item 11) against dense float64 truth.

The first product keeps each batch's forward and first-backward graph while they fit in the
problem's ``graph_cache`` budget; later products run only the second backward. Every product
must still be the full-data Hessian's: on every standard case, on the padded transformer and
the LSTM, with a budget that keeps only some batches, and after the weights change in place.
"""

from __future__ import annotations

import gc

import pytest
import torch

from curvscope import Problem
from curvscope.operators import HessianOperator, graph_account

from .cases import CASES, build
from .test_sequences import _gpt, _gpt_batches, _gpt_truth, _lstm_case, _lstm_truth
from .truth import assert_close, dense_hessian, hessian_by_double_backward


def _columns(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_products_over_kept_graphs_match_dense_truth(case):
    model, loss, data, reduction = build(case)
    truth = dense_hessian(model, loss, data, reduction)
    problem = Problem(model, loss, data, reduction=reduction)
    H = HessianOperator(problem)
    v, V = _columns(H.shape[0], 1, 1), _columns(H.shape[0], 4, 2)
    assert_close(H @ v, truth @ v, what="first product (keeps the graphs)")
    kept = H.info["kept_graphs"]
    assert kept["batches"] == kept["of_batches"] == len(problem.batch_sizes)
    assert kept["bytes"] > 0 and graph_account(problem).held == kept["bytes"]
    passes = problem.data_passes
    assert_close(H @ V, truth @ V, what="products over kept graphs")
    assert_close(H @ v, truth @ v, what="a third product")
    assert problem.data_passes == passes  # the data are not read again
    assert H.num_matvecs == 1 + 4 + 1
    assert graph_account(problem).record["kept_graphs"] == kept


def test_transformer_and_lstm_products_over_kept_graphs():
    model = _gpt()
    problem = Problem(model, "causal_lm", _gpt_batches(), reduction="mean")
    loss, _, w, _ = _gpt_truth(model)
    truth = hessian_by_double_backward(loss, w)
    H = HessianOperator(problem)
    for seed in (1, 2, 3):
        V = _columns(problem.num_params, 2, seed)
        assert_close(H @ V, truth @ V, what=f"transformer product {seed}")
    assert H.info["kept_graphs"]["batches"] == 2

    lstm, x, y, batches = _lstm_case()
    problem = Problem(lstm, "cross_entropy", batches, reduction="mean")
    loss, _, w, _ = _lstm_truth(lstm, x, y)
    truth = hessian_by_double_backward(loss, w)  # the definition, not the streamed product
    H = HessianOperator(problem)
    for seed in (4, 5):
        V = _columns(problem.num_params, 2, seed)
        assert_close(H @ V, truth @ V, what=f"LSTM product {seed}")
    assert H.info["kept_graphs"]["batches"] == 2


def test_a_budget_for_one_batch_keeps_a_prefix_and_streams_the_rest():
    case = CASES[0]  # two batches of 3 and 4 samples
    model, loss, data, reduction = build(case)
    truth = dense_hessian(model, loss, data, reduction)
    probe = HessianOperator(Problem(model, loss, data, reduction=reduction))
    probe @ _columns(probe.shape[0], 1, 0)
    full = probe.info["kept_graphs"]["bytes"]
    problem = Problem(model, loss, data, reduction=reduction, graph_cache=0.6 * full)
    H = HessianOperator(problem)
    for seed in (1, 2, 3):
        V = _columns(H.shape[0], 2, seed)
        assert_close(H @ V, truth @ V, what=f"partly kept product {seed}")
    kept = H.info["kept_graphs"]
    assert (kept["batches"], kept["of_batches"]) == (1, 2)
    assert kept["bytes"] <= 0.6 * full
    before = problem.data_passes
    H @ _columns(H.shape[0], 1, 4)
    assert problem.data_passes == before + 1  # the batch that did not fit is streamed


def test_weights_changed_in_place_drop_the_kept_graphs():
    model, loss, data, reduction = build(CASES[2])
    problem = Problem(model, loss, data, reduction=reduction)
    H = HessianOperator(problem)
    v = _columns(H.shape[0], 1, 1)
    assert_close(H @ v, dense_hessian(model, loss, data, reduction) @ v, what="before")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)  # the problem's parameters are views of these
    truth = dense_hessian(model, loss, data, reduction)
    assert_close(H @ v, truth @ v, what="after the weights changed")
    assert_close(H @ v, truth @ v, what="over the graphs kept at the new weights")


def test_kept_bytes_are_shared_by_views_and_given_back():
    model, loss, data, reduction = build(CASES[4])  # the BN-CNN
    problem = Problem(model, loss, data, reduction=reduction)
    H = HessianOperator(problem)
    H @ _columns(H.shape[0], 1, 1)
    held = graph_account(problem).held
    assert held == H.info["kept_graphs"]["bytes"] > 0
    name = problem.names[0]
    block = H.block(name)
    block @ _columns(block.shape[0], 1, 2)
    part = block.info["kept_graphs"]["bytes"]
    assert graph_account(problem).held == held + part  # the block's graphs count on one account
    H.release()
    assert graph_account(problem).held == part
    del block
    gc.collect()
    assert graph_account(problem).held == 0

    # a budget already spent by one view leaves nothing for the next
    problem = Problem(model, loss, data, reduction=reduction, graph_cache=held)
    H = HessianOperator(problem)
    H @ _columns(H.shape[0], 1, 1)
    other = HessianOperator(problem.select(name))
    other @ _columns(other.shape[0], 1, 2)
    assert "kept_graphs" not in other.info


def test_graph_cache_zero_streams_every_product():
    model, loss, data, reduction = build(CASES[1])
    truth = dense_hessian(model, loss, data, reduction)
    problem = Problem(model, loss, data, reduction=reduction, graph_cache=0)
    H = HessianOperator(problem)
    V = _columns(H.shape[0], 2, 1)
    passes = problem.data_passes
    assert_close(H @ V, truth @ V, what="streamed")
    assert_close(H @ V, truth @ V, what="streamed again")
    assert problem.data_passes == passes + 2
    assert "kept_graphs" not in H.info and graph_account(problem).held == 0
