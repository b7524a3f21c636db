"""`autodiff`: the book's Appendix A, automatic differentiation from scratch (`torchbook.autodiff`).

Part 1: the gradient of f(x, y) = x²y + y + 2 at (3, 4) by hand, by finite differences (the book's printed
24.000039999805264 and 10.000000000331966), in forward mode with dual numbers and in reverse mode with a tape; the
report draws f's computation graph with each edge's forward value and the gradient that flowed back along it.

Part 2: reverse mode trains something. A ReLU MLP on scikit-learn's digits (offline) is trained twice from the same
initial weights on the same batches, in float64 with plain SGD: once with our tape's gradients (NumPy), once with
torch's autograd through torchbook's `Trainer`. The report gives the largest weight difference over every step
(parity: below 1e-8) and both models' test accuracy. The appendix itself trains no network, so the book prints no
figure for part 2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

import torchbook
from torchbook import autodiff
from torchbook.data.images import load_digits
from torchbook.data.splits import split_indices, split_record
from torchbook.devices import device_of
from torchbook.errors import UserInputError
from torchbook.hub import save_model
from torchbook.models.mlp import MLP, MLPConfig
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train import Trainer
from torchbook.train.config import TrainConfig

NAME = "autodiff"
BOOK_GRADIENT = (24, 10)  # ∂f/∂x and ∂f/∂y of f(x, y) = x²y + y + 2 at (3, 4)
BOOK_FINITE_DIFFERENCES = (24.000039999805264, 10.000000000331966)  # eps = 1e-5
POINT = (3.0, 4.0)
EPS = 1e-5


@dataclass
class Config(TrainConfig):
    hidden: list[int] = field(default_factory=lambda: [64])
    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "sgd"  # plain SGD: the update our NumPy loop applies too
    lr: float = 0.1
    device: str = "cpu"  # the parity is a float64 CPU comparison
    restore_best: bool = False  # both models keep their last step's weights
    limit: int = 0  # use only this many training images (0 = all), for smoke runs

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"epochs": 6, "limit": 300},
        "quick": {"epochs": 10},
        "book": {},  # the appendix trains no network; these are our settings
    }

    def validate(self) -> None:
        super().validate()
        if self.optimizer != "sgd" or self.momentum or self.weight_decay or self.grad_accum != 1 or self.grad_clip:
            raise UserInputError("autodiff compares plain SGD step for step: keep optimizer=sgd with momentum=0, "
                                 "weight_decay=0, grad_accum=1 and grad_clip=0")


class StepRecorder:
    """A `Trainer` callback keeping the model's weights after every optimizer step."""

    def __init__(self) -> None:
        self.weights: list[list[np.ndarray]] = []

    def on_step_end(self, trainer: Any, loss: float) -> None:
        self.weights.append([p.detach().cpu().numpy().copy() for p in trainer.model.parameters()])


def gradient_table() -> tuple[list[list[Any]], dict[str, tuple[float, float]]]:
    """The four ways to f's gradient at (3, 4), with the passes each needs."""
    x, y = POINT
    results = {
        "by hand": autodiff.f_gradient_by_hand(x, y),
        "finite differences (eps 1e-5)": (autodiff.finite_difference(autodiff.f, x, y, EPS, 0),
                                          autodiff.finite_difference(autodiff.f, x, y, 0, EPS)),
        "forward mode (dual numbers)": tuple(autodiff.forward_mode_gradient(autodiff.f, x, y)),
        "reverse mode (tape)": tuple(autodiff.reverse_mode_gradient(autodiff.f, x, y)),
    }
    cost = {"by hand": "derivation", "finite differences (eps 1e-5)": "3 calls of f (n + 1)",
            "forward mode (dual numbers)": "2 passes (one per input)", "reverse mode (tape)": "1 forward + 1 backward"}
    rows = [[name, repr(float(dx)), repr(float(dy)), cost[name]] for name, (dx, dy) in results.items()]
    return rows, {k: (float(a), float(b)) for k, (a, b) in results.items()}


def draw_graph(path: Path) -> Path:
    """f's computation graph as recorded on the tape: each node with its value, each edge with the value that went
    forward (blue) and the gradient ∂f/∂(that value) that flowed back along it (red); the leaves' total gradients
    are the sums of their edges' (y: 9 + 1 = 10)."""
    from torchbook.plots import plt, save_figure

    x, y = autodiff.Var(POINT[0], "x"), autodiff.Var(POINT[1], "y")
    with autodiff.Tape() as tape:
        out = autodiff.f(x, y)
    grads, edges = tape.backward(out)
    names = {id(x): "x", id(y): "y"}
    leaves: list[autodiff.Var] = []  # in the order operations first use them
    depth: dict[int, int] = {}
    first_use: dict[int, int] = {}
    for node in tape.nodes:
        for v in node.inputs:
            if id(v) not in depth and all(id(v) != id(n.out) for n in tape.nodes):
                names.setdefault(id(v), f"{float(v.data):g}")  # a constant
                depth[id(v)] = 0
                leaves.append(v)
        depth[id(node.out)] = 1 + max(depth[id(v)] for v in node.inputs)
        for v in node.inputs:
            first_use.setdefault(id(v), depth[id(node.out)])
    label = {id(n.out): n.op for n in tape.nodes}
    # Operations on one row, left to right; each leaf above or below (alternately), just before its first use.
    position = {id(n.out): (depth[id(n.out)] * 2.2, 0.0) for n in tape.nodes}
    for i, leaf in enumerate(leaves):
        position[id(leaf)] = (first_use[id(leaf)] * 2.2 - 1.6, 1.7 if i % 2 == 0 else -1.7)
    values = {id(v): float(v.data) for n in tape.nodes for v in (*n.inputs, n.out)}

    fig, ax = plt.subplots(figsize=(11, 4.6))
    for node, k, contribution in edges:
        src, dst = position[id(node.inputs[k])], position[id(node.out)]
        ax.annotate("", xy=dst, xytext=src, arrowprops={"arrowstyle": "->", "color": "0.4", "shrinkA": 22, "shrinkB": 22})
        mx, my = src[0] + 0.45 * (dst[0] - src[0]), src[1] + 0.45 * (dst[1] - src[1])
        ax.text(mx - 0.12, my + 0.12, f"{values[id(node.inputs[k])]:g}", color="tab:blue", ha="right", fontsize=10)
        ax.text(mx + 0.12, my - 0.12, f"{float(contribution):g}", color="tab:red", ha="left", va="top", fontsize=10)
    for key, (px, py) in position.items():
        is_leaf = key not in label
        ax.add_patch(plt.Circle((px, py), 0.42, fc="#e8f0fe" if is_leaf else "#fff3e0", ec="0.3"))
        ax.text(px, py, label.get(key, names.get(key, "?")), ha="center", va="center", fontsize=12, weight="bold")
        note = f"{values[key]:g}, ∂f = {float(grads[key]):g}" if key in grads else f"{values[key]:g}"
        ax.text(px, py + (0.55 if py >= 0 else -0.55), note, ha="center", va="bottom" if py >= 0 else "top",
                fontsize=8, color="0.25")
    ax.set_title("f(x, y) = x²y + y + 2 at (3, 4): forward values (blue) and backward gradients (red) on the edges")
    ax.set_aspect("equal")
    ax.axis("off")
    xs = [p[0] for p in position.values()]
    ys = [p[1] for p in position.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 0.8)
    return save_figure(fig, path)


def digits_split(config: Config) -> tuple[Any, dict[str, np.ndarray]]:
    data = load_digits()
    splits = split_indices(len(data.images), val=0.15, test=0.20, seed=config.seed, stratify=data.labels)
    if config.limit:
        splits["train"] = splits["train"][: config.limit]
    return data, splits


def accuracy(params: list[np.ndarray], images: np.ndarray, labels: np.ndarray) -> float:
    logits = autodiff.mlp_forward([autodiff.Var(p) for p in params], images.reshape(len(images), -1)).data
    return float((logits.argmax(1) == labels).mean())


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    data, splits = digits_split(config)
    report = Report("Automatic differentiation from scratch", NAME, "A (appendix)", data.source)
    run.write_json("split.json", split_record(splits, data.source, config.seed, dataset=data.name))

    # Part 1: f's gradient four ways, and its graph.
    rows, results = gradient_table()
    for name, (dx, dy) in results.items():
        book = BOOK_FINITE_DIFFERENCES if name.startswith("finite") else BOOK_GRADIENT
        report.compare(f"∂f/∂x, {name}", repr(dx), repr(float(book[0])) if name.startswith("finite") else book[0])
        report.compare(f"∂f/∂y, {name}", repr(dy), repr(float(book[1])) if name.startswith("finite") else book[1])
    draw_graph(run.plots / "computation_graph.png")

    # Part 2: the same MLP trained with our gradients and with torch's, step for step.
    images = data.images.reshape(len(data.images), -1).astype(np.float64)
    torch.manual_seed(config.seed)
    model = MLP(MLPConfig(images.shape[1], len(data.classes), list(config.hidden), "relu", standardize=False)).double()
    initial = [p.detach().numpy().copy() for p in model.parameters()]
    train = TensorDataset(torch.from_numpy(images[splits["train"]]), torch.from_numpy(data.labels[splits["train"]]))
    recorder = StepRecorder()
    trainer = Trainer(model, config, run, train, criterion=torch.nn.CrossEntropyLoss(), callbacks=[recorder])
    started = time.perf_counter()
    trainer.fit()
    torch_seconds = time.perf_counter() - started

    x_train, y_train = images[splits["train"]], data.labels[splits["train"]]
    batches = ((x_train[idx], y_train[idx]) for epoch in range(config.epochs) for idx in trainer.batches(epoch))
    started = time.perf_counter()
    ours = list(autodiff.sgd_steps(initial, batches, config.lr))
    our_seconds = time.perf_counter() - started
    if len(ours) != len(recorder.weights):  # e.g. a resumed run: the trainer did not replay its first steps
        raise UserInputError(f"{len(ours)} steps of ours against {len(recorder.weights)} of the trainer; "
                           "run the comparison from the start (it takes seconds)")
    differences = [max(float(np.abs(a - b).max()) for a, b in zip(mine, theirs, strict=True))
                   for mine, theirs in zip(ours, recorder.weights, strict=True)]
    final = ours[-1]

    with torch.no_grad():  # the saved model: torch's MLP holding the weights our tape trained, in float32
        for p, w in zip(model.parameters(), final, strict=True):
            p.copy_(torch.from_numpy(w))
    model.float()
    save_model(model, run.model_dir, extra={"classes": data.classes, "image_shape": list(data.images.shape[1:])})
    test_x, test_y = images[splits["test"]], data.labels[splits["test"]]
    results_json = {
        "gradients": {k: list(v) for k, v in results.items()},
        "steps": len(ours),
        "max_weight_difference": max(differences),
        "test_accuracy_ours": accuracy(final, test_x, test_y),
        "test_accuracy_torch": accuracy(recorder.weights[-1], test_x, test_y),
        "val_accuracy_ours": accuracy(final, images[splits["val"]], data.labels[splits["val"]]),
        "seconds_ours": our_seconds,
        "seconds_torch_trainer": torch_seconds,
    }
    run.write_json("results.json", results_json)
    run.log(kind="eval", **{k: v for k, v in results_json.items() if k != "gradients"})

    report.compare("largest |W_ours - W_torch| over all steps", results_json["max_weight_difference"], None,
                   f"{len(ours)} SGD steps, float64, every weight after every step")
    report.compare("test accuracy, our gradients", results_json["test_accuracy_ours"], None,
                   f"{len(test_y)} digits; chance is 0.1")
    report.compare("test accuracy, torch autograd (Trainer)", results_json["test_accuracy_torch"], None, "same run")
    report.table("The four ways to f's gradient at (3, 4)", ["method", "∂f/∂x", "∂f/∂y", "cost"], rows)
    report.text("Training with our tape", (
        f"A {images.shape[1]}-{'-'.join(map(str, config.hidden))}-10 ReLU MLP, {len(splits['train'])} training "
        f"digits, batch {config.batch_size}, SGD lr {config.lr}, {config.epochs} epochs ({len(ours)} steps). Our "
        f"NumPy tape took {our_seconds:.2f} s, torch through the Trainer {torch_seconds:.2f} s (the Trainer also "
        "checkpoints and logs). The weights agree after every step to "
        f"{results_json['max_weight_difference']:.1e}: our reverse mode computes the same gradients as torch's."))
    report.table("Data split", ["split", "images"], [[k, len(v)] for k, v in splits.items()])
    report.image("Computation graph of f", run.plots / "computation_graph.png", run.path)
    report.write(run.path)
    return run


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, float]:
    """Reload the saved model (torch's MLP with our weights) and measure it on the run's test split."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    data, splits = digits_split(config)
    loaded = torchbook.load(run.path, map_location=device)
    with torch.no_grad():
        logits = loaded.model(torch.from_numpy(data.images[splits["test"]]).to(device_of(loaded.model)))
    return {"test_accuracy": float((logits.argmax(1).cpu().numpy() == data.labels[splits["test"]]).mean()),
            "test_images": len(splits["test"])}


RECIPE = Recipe(NAME, "A", "Autodiff from scratch: f's gradient four ways; an MLP trained with our tape equals torch's",
                Config, run, evaluate)
