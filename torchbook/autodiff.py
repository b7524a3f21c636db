"""Automatic differentiation from scratch (the book's Appendix A), in NumPy float64.

The appendix computes the gradient of f(x, y) = x²y + y + 2 at (3, 4), which is (24, 10), four ways:

1. by hand: ∂f/∂x = 2xy, ∂f/∂y = x² + 1 (`f_gradient_by_hand`);
2. finite differences: (f(x + ε) - f(x)) / ε, one extra call of f per input, approximate
   (`finite_difference`, the book's `derivative` function; ε = 1e-5 gives its printed 24.000039999805264 and
   10.000000000331966);
3. forward mode with dual numbers a + bε, ε² = 0: f(a + ε) = f(a) + f'(a)ε, one pass per input, exact
   (`Dual`, `forward_mode_gradient`);
4. reverse mode: one forward pass records every operation on a tape, one backward pass walks the tape from the
   output to the inputs applying the chain rule, so a single pass gives the gradient for every input, which is
   why deep learning uses it (`Var`, `Tape`).

The reverse mode here is general enough to train a network: elementwise arithmetic with NumPy broadcasting,
matrix products, sums and means, exp, log, ReLU and softmax cross-entropy. Its names follow torch's
(`x.sum(dim, keepdim)`, `x.relu()`, `x @ w.T`), so one expression runs on both and the tests compare the gradients
with `torch.autograd`'s.

    with Tape() as tape:
        x, y = Var(3.0), Var(4.0)
        z = x**2 * y + y + 2
    tape.gradient(z, [x, y])        # [array(24.), array(10.)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray
Number = float | int


# -- 1 and 2: by hand and by finite differences ------------------------------------------------------------------
def f(x: Any, y: Any) -> Any:
    """The appendix's function f(x, y) = x²y + y + 2 (works on floats, `Dual`s and `Var`s)."""
    return x**2 * y + y + 2


def f_gradient_by_hand(x: float, y: float) -> tuple[float, float]:
    """∂f/∂x = 2xy and ∂f/∂y = x² + 1, derived with the rules of calculus."""
    return 2 * x * y, x**2 + 1


def finite_difference(func: Callable[[float, float], float], x: float, y: float, x_eps: float, y_eps: float) -> float:
    """The book's `derivative`: (f(x + x_eps, y + y_eps) - f(x, y)) / (x_eps + y_eps), a forward difference along
    one input. Its error is O(ε) from the curvature plus rounding of order machine-ε / ε."""
    return (func(x + x_eps, y + y_eps) - func(x, y)) / (x_eps + y_eps)


# -- 3: forward mode with dual numbers -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Dual:
    """a + bε with ε² = 0: (a + bε)(c + dε) = ac + (ad + bc)ε, so evaluating f on (x + ε) carries f'(x) along
    in the ε part (the book's Figure A-2)."""

    value: float
    eps: float = 0.0

    @staticmethod
    def lift(other: Dual | Number) -> Dual:
        return other if isinstance(other, Dual) else Dual(float(other))

    def __add__(self, other: Dual | Number) -> Dual:
        o = Dual.lift(other)
        return Dual(self.value + o.value, self.eps + o.eps)

    __radd__ = __add__

    def __sub__(self, other: Dual | Number) -> Dual:
        o = Dual.lift(other)
        return Dual(self.value - o.value, self.eps - o.eps)

    def __rsub__(self, other: Number) -> Dual:
        return Dual.lift(other) - self

    def __mul__(self, other: Dual | Number) -> Dual:
        o = Dual.lift(other)
        return Dual(self.value * o.value, self.value * o.eps + self.eps * o.value)

    __rmul__ = __mul__

    def __truediv__(self, other: Dual | Number) -> Dual:
        o = Dual.lift(other)
        return Dual(self.value / o.value, (self.eps * o.value - self.value * o.eps) / o.value**2)

    def __rtruediv__(self, other: Number) -> Dual:
        return Dual.lift(other) / self

    def __pow__(self, n: Number) -> Dual:
        return Dual(self.value**n, n * self.value ** (n - 1) * self.eps)


def forward_mode_gradient(func: Callable[..., Any], *point: float) -> list[float]:
    """One forward pass per input, seeding that input's ε part with 1: exact derivatives, but n passes for n
    inputs (fine for few inputs, hopeless for a network's millions of weights)."""
    grads = []
    for i in range(len(point)):
        args = [Dual(v, 1.0 if j == i else 0.0) for j, v in enumerate(point)]
        grads.append(func(*args).eps)
    return grads


# -- 4: reverse mode with a tape ------------------------------------------------------------------------------------
@dataclass
class Node:
    """One recorded operation: `out = op(*inputs)`, with `vjps[k](g)` giving the gradient flowing to `inputs[k]`
    from the gradient `g` of `out` (the vector-Jacobian product: the local chain-rule factor)."""

    op: str
    inputs: tuple[Var, ...]
    out: Var
    vjps: tuple[Callable[[Array], Array], ...]


_TAPES: list[Tape] = []


class Tape:
    """The list of operations in the order they ran (a Wengert list). Every `Var` operation inside `with Tape()`
    appends a `Node`; `gradient` walks them backwards once."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def __enter__(self) -> Tape:
        _TAPES.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _TAPES.remove(self)

    def gradient(self, output: Var, inputs: Sequence[Var]) -> list[Array]:
        """d output / d input for each input (zeros for an input the output does not depend on)."""
        grads, _ = self.backward(output)
        return [grads.get(id(v), np.zeros_like(v.data)) for v in inputs]

    def backward(self, output: Var) -> tuple[dict[int, Array], list[tuple[Node, int, Array]]]:
        """Reverse mode: seed d output / d output = 1, then for each node from last to first, pass its output's
        gradient to its inputs through the chain rule, adding up the contributions of every path (a variable
        used twice gets two). Returns every variable's gradient (by `id`) and what flowed along each edge
        (node, input position, contribution). The output must be a scalar, as a loss is."""
        if output.data.size != 1:
            raise ValueError(f"gradient needs a scalar output, got shape {output.data.shape}")
        grads: dict[int, Array] = {id(output): np.ones_like(output.data)}
        edges: list[tuple[Node, int, Array]] = []
        for node in reversed(self.nodes):
            g = grads.get(id(node.out))
            if g is None:
                continue  # does not lead to the output
            for k, (var, vjp) in enumerate(zip(node.inputs, node.vjps, strict=True)):
                contribution = vjp(g)
                edges.append((node, k, contribution))
                grads[id(var)] = grads[id(var)] + contribution if id(var) in grads else contribution
        return grads, edges


def unbroadcast(grad: Array, shape: tuple[int, ...]) -> Array:
    """The gradient for an input that NumPy broadcast to the output's shape: sum over the copies it made (the
    leading axes it lacked and the axes where it had size 1)."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


class Var:
    """A float64 array that records the operations applied to it on the active `Tape`.

    Operations: + - * / (broadcasting), ** (number exponent), @ (matrices and vectors), `.T`, `.sum(dim, keepdim)`,
    `.mean(dim, keepdim)`, `.exp()`, `.log()`, `.relu()`, `.reshape(*shape)`, and `cross_entropy(logits, labels)`.
    """

    __array_priority__ = 100  # numpy array (op) Var -> Var's reflected op

    def __init__(self, data: Any, name: str = ""):
        self.data: Array = np.asarray(data, dtype=np.float64)
        self.name = name

    def __repr__(self) -> str:
        return f"Var({self.data!r}{', name=' + repr(self.name) if self.name else ''})"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @staticmethod
    def lift(value: Var | Any) -> Var:
        return value if isinstance(value, Var) else Var(value)

    @staticmethod
    def record(op: str, data: Array, inputs: tuple[Var, ...], vjps: tuple[Callable[[Array], Array], ...]) -> Var:
        out = Var(data)
        if _TAPES:
            _TAPES[-1].nodes.append(Node(op, inputs, out, vjps))
        return out

    # -- elementwise arithmetic (broadcasting) --
    def __add__(self, other: Var | Any) -> Var:
        o = Var.lift(other)
        return Var.record("+", self.data + o.data, (self, o),
                          (lambda g: unbroadcast(g, self.shape), lambda g: unbroadcast(g, o.shape)))

    def __radd__(self, other: Any) -> Var:
        return Var.lift(other) + self

    def __neg__(self) -> Var:
        return Var.record("neg", -self.data, (self,), (lambda g: -g,))

    def __sub__(self, other: Var | Any) -> Var:
        o = Var.lift(other)
        return Var.record("-", self.data - o.data, (self, o),
                          (lambda g: unbroadcast(g, self.shape), lambda g: unbroadcast(-g, o.shape)))

    def __rsub__(self, other: Any) -> Var:
        return Var.lift(other) - self

    def __mul__(self, other: Var | Any) -> Var:
        o = Var.lift(other)
        return Var.record("×", self.data * o.data, (self, o),
                          (lambda g: unbroadcast(g * o.data, self.shape), lambda g: unbroadcast(g * self.data, o.shape)))

    def __rmul__(self, other: Any) -> Var:
        return Var.lift(other) * self

    def __truediv__(self, other: Var | Any) -> Var:
        o = Var.lift(other)
        return Var.record("/", self.data / o.data, (self, o),
                          (lambda g: unbroadcast(g / o.data, self.shape),
                           lambda g: unbroadcast(-g * self.data / o.data**2, o.shape)))

    def __rtruediv__(self, other: Any) -> Var:
        return Var.lift(other) / self

    def __pow__(self, n: Number) -> Var:
        return Var.record(f"**{n}", self.data**n, (self,), (lambda g: g * n * self.data ** (n - 1),))

    # -- linear algebra --
    def __matmul__(self, other: Var | Any) -> Var:
        """Matrix (or vector) product. For C = A B: dA = dC Bᵀ and dB = Aᵀ dC; a vector operand is treated as a
        column (right) or a row (left), as NumPy does."""
        o = Var.lift(other)
        a, b = self.data, o.data
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b

        def as_matrix(g: Array) -> Array:  # the output gradient with the squeezed axes back
            g = g[None, ...] if a.ndim == 1 else g
            return g[..., None] if b.ndim == 1 else g

        return Var.record("@", a @ b, (self, o),
                          (lambda g: (as_matrix(g) @ b2.T).reshape(a.shape),
                           lambda g: (a2.T @ as_matrix(g)).reshape(b.shape)))

    def __rmatmul__(self, other: Any) -> Var:
        return Var.lift(other) @ self

    @property
    def T(self) -> Var:  # noqa: N802 (torch's and NumPy's name)
        return Var.record("ᵀ", self.data.T, (self,), (lambda g: g.T,))

    def reshape(self, *shape: int) -> Var:
        return Var.record("reshape", self.data.reshape(*shape), (self,), (lambda g: g.reshape(self.shape),))

    # -- reductions --
    def sum(self, dim: int | None = None, keepdim: bool = False) -> Var:
        """Sum over `dim` (all axes when None). Backward: every summed element gets the output's gradient."""
        out = self.data.sum(axis=dim, keepdims=keepdim)

        def vjp(g: Array) -> Array:
            if dim is not None and not keepdim:
                g = np.expand_dims(g, dim)
            return np.broadcast_to(g, self.shape).copy()

        return Var.record("sum", out, (self,), (vjp,))

    def mean(self, dim: int | None = None, keepdim: bool = False) -> Var:
        count = self.data.size if dim is None else self.data.shape[dim]
        return self.sum(dim, keepdim) / count

    # -- elementwise functions --
    def exp(self) -> Var:
        out = np.exp(self.data)
        return Var.record("exp", out, (self,), (lambda g: g * out,))

    def log(self) -> Var:
        return Var.record("log", np.log(self.data), (self,), (lambda g: g / self.data,))

    def relu(self) -> Var:
        """max(x, 0); its derivative is taken as 0 at x = 0, as torch does."""
        return Var.record("relu", np.maximum(self.data, 0.0), (self,), (lambda g: g * (self.data > 0),))


def cross_entropy(logits: Var, labels: Any) -> Var:
    """Mean softmax cross-entropy of (batch, classes) logits against integer labels, as
    `torch.nn.functional.cross_entropy`: -mean(log softmax(logits)[i, label_i]), computed stably (the largest logit
    subtracted). One fused operation: its gradient is (softmax(logits) - onehot(labels)) / batch."""
    labels = np.asarray(labels)
    z = logits.data - logits.data.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    batch = np.arange(len(labels))
    loss = -log_probs[batch, labels].mean()

    def vjp(g: Array) -> Array:
        grad = np.exp(log_probs)
        grad[batch, labels] -= 1.0
        return g * grad / len(labels)

    return Var.record("cross-entropy", np.asarray(loss), (logits,), (vjp,))


def reverse_mode_gradient(func: Callable[..., Var], *point: float) -> list[float]:
    """One forward pass recorded on a tape, one backward pass: every partial derivative at once."""
    inputs = [Var(v) for v in point]
    with Tape() as tape:
        out = func(*inputs)
    return [float(g) for g in tape.gradient(out, inputs)]


# -- training a network with it ------------------------------------------------------------------------------------
def mlp_forward(params: Sequence[Var], x: Var | Array) -> Var:
    """An MLP in `torch.nn.Linear`'s layout: params = [W1, b1, W2, b2, ...] with W (out, in); ReLU between
    layers, none after the last (logits)."""
    h = Var.lift(x)
    for i in range(0, len(params), 2):
        h = h @ params[i].T + params[i + 1]
        if i + 2 < len(params):
            h = h.relu()
    return h


def sgd_steps(params: Sequence[Array], batches: Iterable[tuple[Array, Array]], lr: float) -> Iterator[list[Array]]:
    """Plain SGD on the MLP's mean cross-entropy with gradients from our tape: for each (images, labels) batch,
    W <- W - lr dL/dW. Yields the weights after each step (copies), so they can be compared step for step.

    This is the appendix's point (our reverse mode trains a network), not a second trainer: torchbook's `Trainer`
    trains torch modules, and the `autodiff` recipe trains the same MLP with it to compare."""
    weights = [np.array(p, dtype=np.float64) for p in params]
    for images, labels in batches:
        variables = [Var(w) for w in weights]
        with Tape() as tape:
            loss = cross_entropy(mlp_forward(variables, images), labels)
        grads = tape.gradient(loss, variables)
        weights = [w - lr * g for w, g in zip(weights, grads, strict=True)]
        yield [w.copy() for w in weights]
