"""Appendix A: the four ways to the gradient of f(x, y) = x²y + y + 2, and reverse mode against torch.autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchbook import autodiff
from torchbook.autodiff import Dual, Tape, Var, cross_entropy


def test_the_four_ways_give_the_books_figures():
    assert autodiff.f_gradient_by_hand(3, 4) == (24, 10)
    # The book's printed values, to the last digit: same ε (1e-5), same float64 arithmetic.
    assert autodiff.finite_difference(autodiff.f, 3, 4, 0.00001, 0) == 24.000039999805264
    assert autodiff.finite_difference(autodiff.f, 3, 4, 0, 0.00001) == 10.000000000331966
    assert autodiff.forward_mode_gradient(autodiff.f, 3.0, 4.0) == [24.0, 10.0]
    assert autodiff.reverse_mode_gradient(autodiff.f, 3.0, 4.0) == [24.0, 10.0]
    assert autodiff.f(3, 4) == autodiff.f(Dual(3.0), Dual(4.0)).value == 42


def test_dual_numbers_follow_the_rules_of_calculus():
    x = Dual(2.0, 1.0)
    assert (x * x * x).eps == 12.0  # d(x³)/dx = 3x²
    assert (1 / x).eps == -0.25  # d(1/x)/dx = -1/x²
    assert (x**3 - 2 * x + 5).eps == 10.0


def test_a_variable_used_twice_gets_both_contributions():
    x = Var(3.0)
    with Tape() as tape:
        z = x * x + x  # dz/dx = 2x + 1
    assert tape.gradient(z, [x])[0] == 7.0
    assert tape.gradient(z, [Var(1.0)])[0] == 0.0  # not on the path: zero


# -- random expression graphs, ours against torch.autograd ----------------------------------------------------------
# Every operation is written once and applied to our Var and to torch tensors alike (same method names).
UNARY = {
    "exp": lambda a: (a * 0.3).exp(),
    "log": lambda a: (a * a + 1).log(),
    "relu": lambda a: a.relu(),
    "square": lambda a: a**2,
    "cube": lambda a: a**3,
    "neg": lambda a: -a,
    "scale": lambda a: 1.5 * a - 0.5,
    "reciprocal": lambda a: 1 / (a * a + 1),
}
BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a / (b * b + 0.5)}
REDUCE = {
    "sum0": lambda a: a.sum(0, keepdim=True),  # (n, m) -> (1, m): then broadcast back against (n, m)
    "mean1": lambda a: a.mean(1, keepdim=True),  # (n, m) -> (n, 1)
}
SHAPES = [(4, 3), (1, 3), (3,), (4, 1)]  # all broadcast to (4, 3)


@st.composite
def programs(draw):
    """A random straight-line program over four inputs of broadcastable shapes: each step applies a unary,
    binary or reducing operation to earlier values; a matmul and a cross-entropy may end it."""
    steps = []
    n_values = len(SHAPES)
    for _ in range(draw(st.integers(3, 12))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "reduce"]))
        a = draw(st.integers(0, n_values - 1))
        if kind == "unary":
            steps.append(("unary", draw(st.sampled_from(sorted(UNARY))), a, None))
        elif kind == "binary":
            steps.append(("binary", draw(st.sampled_from(sorted(BINARY))), a, draw(st.integers(0, n_values - 1))))
        else:
            steps.append(("reduce", draw(st.sampled_from(sorted(REDUCE))), a, None))
        n_values += 1
    head = draw(st.sampled_from(["sum", "mean", "matmul", "cross_entropy"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return steps, head, seed


def run_program(program, inputs, matrix, labels, ce):
    steps, head, _ = program
    values = list(inputs)
    for kind, op, a, b in steps:
        x = values[a]
        if kind == "reduce" and x.shape != (4, 3):
            x = x + values[0] * 0  # broadcast to (4, 3) first, so the reduction has both axes
        if kind == "unary":
            values.append(UNARY[op](x))
        elif kind == "binary":
            values.append(BINARY[op](x, values[b]))
        else:
            values.append(REDUCE[op](x))
    last = values[-1] + values[0]  # (4, 3) whatever the last value's shape
    if head == "sum":
        return last.sum()
    if head == "mean":
        return (last * last).mean()
    if head == "matmul":
        return (last @ matrix).relu().sum()
    return ce(last @ matrix, labels)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(programs())
def test_reverse_mode_equals_torch_autograd_on_random_graphs(program):
    rng = np.random.default_rng(program[2])
    arrays = [rng.normal(size=shape) for shape in SHAPES]
    matrix = rng.normal(size=(3, 5))
    labels = rng.integers(0, 5, size=4)

    ours = [Var(a) for a in arrays]
    our_matrix = Var(matrix)
    with Tape() as tape:
        out = run_program(program, ours, our_matrix, labels, cross_entropy)
    our_grads = tape.gradient(out, [*ours, our_matrix])

    theirs = [torch.tensor(a, requires_grad=True) for a in [*arrays, matrix]]
    reference = run_program(program, theirs[:-1], theirs[-1], torch.from_numpy(labels), F.cross_entropy)
    reference.backward()

    np.testing.assert_allclose(out.data, reference.detach().numpy(), rtol=1e-10, atol=1e-10)
    for mine, t in zip(our_grads, theirs, strict=True):
        expected = t.grad.numpy() if t.grad is not None else np.zeros(t.shape)
        np.testing.assert_allclose(mine, expected, rtol=1e-10, atol=1e-10)


def test_matmul_with_vectors_and_transpose_match_torch():
    rng = np.random.default_rng(0)
    a, v, w = rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=3)

    def expression(m, x, y):  # matrix-vector, vector-matrix, transpose, reshape, reductions: a (3,) vector
        return (m @ x) * (y @ m).sum() + (m.T @ y).reshape(2, 2).sum(1).exp().sum()

    ours = [Var(a), Var(v), Var(w)]
    with Tape() as tape:
        vector = expression(*ours)
        total = vector.sum()
    grads = tape.gradient(total, ours)
    theirs = [torch.tensor(x, requires_grad=True) for x in (a, v, w)]
    expression(*theirs).sum().backward()
    for mine, ref in zip(grads, theirs, strict=True):
        np.testing.assert_allclose(mine, ref.grad.numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="scalar"):
        tape.gradient(vector, ours)


# -- the recipe ---------------------------------------------------------------------------------------------------
def test_autodiff_recipe_trains_the_same_mlp_as_torch_step_for_step(tmp_path):
    """An MLP trained on the digits with our tape's gradients has torch's weights after every step (1e-8), and
    learns (far above the 10% of chance); the run folder reloads."""
    import json

    import torchbook
    from torchbook.config import build_config
    from torchbook.recipes import autodiff as recipe

    run = recipe.run(build_config(recipe.Config, preset="smoke"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["steps"] == 6 * 10  # 300 images in batches of 32, 6 epochs
    assert results["max_weight_difference"] < 1e-8
    assert results["test_accuracy_ours"] == results["test_accuracy_torch"] > 0.4
    assert results["gradients"]["finite differences (eps 1e-5)"] == [24.000039999805264, 10.000000000331966]
    report = (run.path / "report.md").read_text()
    assert "24.000039999805264" in report and "computation_graph.png" in report
    assert (run.path / "plots" / "computation_graph.png").read_bytes()[:4] == b"\x89PNG"
    assert torchbook.load(run.path).recipe == "autodiff"
    assert recipe.evaluate(run.path)["test_accuracy"] == pytest.approx(results["test_accuracy_ours"], abs=1e-9)


def test_autodiff_recipe_refuses_settings_it_cannot_compare():
    from torchbook.config import build_config
    from torchbook.errors import UserInputError
    from torchbook.recipes import autodiff as recipe

    for override in ("optimizer=adam", "momentum=0.9", "grad_accum=2"):
        with pytest.raises(UserInputError, match="plain SGD"):
            build_config(recipe.Config, preset="smoke", overrides=[override])
