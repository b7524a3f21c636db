"""Training faster and bigger with the one trainer: mixed precision, compile, activation checkpointing,
chapter 11's regularization (L1/L2 per parameter group, max-norm, MC dropout), TensorBoard, and exact resume
with all of them on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchbook.runs import RunDir
from torchbook.train import Step, TrainConfig, Trainer, speed
from torchbook.train.speed import enable_activation_checkpointing


def problem(n: int = 96) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = (x @ torch.randn(6, 1, generator=g)).tanh() + 0.1 * torch.randn(n, 1, generator=g)
    cut = n * 3 // 4
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(6 if i == 0 else 16, 16), nn.ReLU(), nn.Dropout(dropout)) for i in range(depth)])
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def fit(run: RunDir | None = None, callbacks: Any = (), model: nn.Module | None = None, **settings: Any) -> Trainer:
    config = TrainConfig(**{"epochs": 3, "batch_size": 16, "lr": 0.05, "progress": False, **settings})
    config.validate()
    train, val = problem()
    torch.manual_seed(0)
    trainer = Trainer(model or Net(), config, run, train, val, criterion=nn.MSELoss(), callbacks=callbacks)
    trainer.fit()
    return trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# -- mixed precision ----------------------------------------------------------------------------------------
def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights() -> None:
    dtypes = []

    def step(model: nn.Module, batch: Any) -> Step:
        x, y = batch
        out = model(x)
        dtypes.append(out.dtype)
        return Step(nn.functional.mse_loss(out.float(), y), count=len(x))

    config = TrainConfig(epochs=6, batch_size=16, lr=0.01, precision="bf16", progress=False)
    train, val = problem()
    torch.manual_seed(0)
    trainer = Trainer(Net(), config, None, train, val, step=step)
    before = trainer.evaluate(val)["loss"]
    trainer.fit()
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.evaluate(val)["loss"] < 0.5 * before


def test_fp16_gradient_scaler_skips_overflowing_steps() -> None:
    """fp16 (meant for CUDA; it runs on CPU too): an inf gradient makes the scaler skip the step and halve the
    scale, as appendix B describes."""
    torch.manual_seed(0)
    model = Net()
    calls = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * float("inf") if len(calls) == 3 else grad

    model.head.bias.register_hook(poison)
    seen: dict[int, Any] = {}

    class Watch:
        def on_step_end(self, trainer: Trainer, loss: float) -> None:
            seen[trainer.global_step] = (trainer.scaler.get_scale(), {k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer = fit(model=model, precision="fp16", epochs=1, callbacks=[Watch()])
    assert trainer.scaler.is_enabled()
    assert seen[3][0] == seen[2][0] / 2  # the scale halved at the overflowing step 3...
    assert_same_weights(seen[2][1], seen[3][1])  # ...which left the weights untouched
    assert any(not torch.equal(seen[3][1][k], seen[4][1][k]) for k in seen[3][1])  # and training went on


def test_deferred_loss_readback_as_on_cuda_changes_nothing_but_when_the_loss_is_read(tmp_path: Path) -> None:
    """On CUDA the trainer reads losses back only at logs, checkpoints and epoch ends (no stall per step); the
    same code path forced on CPU gives the same weights, the same logs and still catches a NaN."""
    results = {}
    for sync in (True, False):
        config = TrainConfig(epochs=2, batch_size=16, lr=0.05, log_every=3, checkpoint_every=4, progress=False)
        train, val = problem()
        torch.manual_seed(0)
        trainer = Trainer(Net(), config, RunDir(tmp_path / str(sync)), train, val, criterion=nn.MSELoss())
        trainer.sync_every_step = sync
        trainer.fit()
        logs = [{k: v for k, v in r.items() if k not in ("time", "train_time_s")} for r in RunDir(tmp_path / str(sync)).metrics()]
        results[sync] = (weights(trainer), logs)
    assert_same_weights(results[True][0], results[False][0])
    assert results[True][1] == results[False][1] and len(results[True][1]) > 4

    class Exploding(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * (float("nan") if self.training and trainer.global_step >= 2 else 1.0)

    from torchbook.errors import TrainingDiverged

    train, _ = problem()
    trainer = Trainer(Exploding(), TrainConfig(epochs=1, batch_size=8, log_every=5, progress=False), None, train,
                      criterion=nn.MSELoss())
    trainer.sync_every_step = False
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at or before step 5 \(epoch 1, batch 5\)"):
        trainer.fit()


# -- compile and activation checkpointing -------------------------------------------------------------------
def test_compile_trains_like_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")  # dynamo + AOTAutograd, no C++ build (fast)
    torch._dynamo.reset()
    compiled = fit(compile=True, epochs=2)
    assert isinstance(compiled.forward_module, speed.Compiled) and compiled.forward_module.compiled is not None
    assert_same_weights(weights(compiled), weights(fit(epochs=2)), atol=1e-6)


def test_compile_falls_back_with_a_clear_message(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(module: nn.Module, backend: str) -> Any:
        def call(*args: Any) -> Any:
            raise torch._dynamo.exc.TorchRuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    caplog.set_level("WARNING", logger="torchbook")
    trainer = fit(compile=True, epochs=2)
    err = caplog.text
    assert err.count("could not compile the model") == 1 and "InvalidCxxCompiler" in err
    assert "training without compiling" in err
    assert_same_weights(weights(trainer), weights(fit(epochs=2)))
    monkeypatch.setattr(speed, "compile_unavailable", lambda: "no C++ compiler here")
    caplog.clear()
    fit(compile=True, epochs=1)
    assert "no C++ compiler here" in caplog.text


def test_activation_checkpointing_saves_fewer_activations_same_gradients() -> None:
    torch.manual_seed(0)
    plain, checkpointed = Net(depth=4), Net(depth=4)
    checkpointed.load_state_dict(plain.state_dict())
    assert enable_activation_checkpointing(checkpointed) == list(checkpointed.blocks)
    x = torch.randn(32, 6)

    def saved_and_grads(model: nn.Module) -> tuple[int, list[torch.Tensor]]:
        count = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).pow(2).mean()
        loss.backward()
        return count[0], [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    n_plain, g_plain = saved_and_grads(plain)
    n_ckpt, g_ckpt = saved_and_grads(checkpointed)
    assert n_ckpt <= n_plain // 2  # 3 tensors per block (linear input and weight, relu output) become none
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(a, b)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # names untouched: saving works as before
    assert_same_weights(weights(fit(activation_checkpointing=True)), weights(fit()))


# -- regularization -----------------------------------------------------------------------------------------
def test_l1_l2_penalize_the_weights_group_only_like_a_penalty_in_the_loss() -> None:
    l1, l2 = 1e-3, 1e-2
    trainer = fit(optimizer="sgd", l1=l1, l2=l2, epochs=2, batch_size=72)  # one batch per epoch
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["weights", "biases_and_norms"]
    assert [(g["l1"], g["l2"]) for g in trainer.optimizer.param_groups] == [(l1, l2), (0.0, 0.0)]
    torch.manual_seed(0)
    reference = Net()
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    x, y = problem()[0].tensors
    for _ in range(2):
        opt.zero_grad()
        matrices = [p for p in reference.parameters() if p.ndim == 2]
        penalty = sum(l1 * w.abs().sum() + l2 * w.pow(2).sum() for w in matrices)
        (nn.functional.mse_loss(reference(x), y) + penalty).backward()
        opt.step()
    assert_same_weights(weights(trainer), reference.state_dict(), atol=1e-6)


def test_max_norm_caps_each_neurons_incoming_weights() -> None:
    trainer = fit(max_norm=0.6, lr=0.2)
    norms = [p.norm(dim=1) for p in trainer.model.parameters() if p.ndim == 2]
    assert all((n <= 0.6 + 1e-5).all() for n in norms)
    assert any((n > 0.6 - 1e-4).any() for n in norms)  # the constraint was active
    free = fit(lr=0.2)
    assert any((p.norm(dim=1) > 0.6 + 1e-3).any() for p in free.model.parameters() if p.ndim == 2)


def test_mc_dropout_mean_and_std_over_stochastic_passes() -> None:
    trainer = fit(model=Net(dropout=0.3))
    model = trainer.model
    model.blocks.append(nn.BatchNorm1d(16))  # batch norm must stay in eval mode (running statistics unchanged)
    model.blocks[-1].running_mean.fill_(0.5)
    _, val = problem()
    model.train()
    torch.manual_seed(7)
    mean, std = trainer.predict_mc(val, samples=20)
    assert all(m.training for m in model.modules())  # the model's modes are restored afterwards
    torch.manual_seed(7)
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    with torch.no_grad():
        passes = torch.stack([model(val.tensors[0]) for _ in range(20)])
    torch.testing.assert_close(mean, passes.mean(0))
    torch.testing.assert_close(std, passes.std(0, unbiased=False))
    assert (std > 0).all() and torch.equal(model.blocks[-1].running_mean, torch.full((16,), 0.5))
    probs, _ = trainer.predict_mc(val, samples=5, transform=lambda z: torch.cat([z, -z], 1).softmax(-1))
    torch.testing.assert_close(probs.sum(1), torch.ones(len(val)))
    deterministic = fit(model=Net(dropout=0.0))
    assert torch.equal(deterministic.predict_mc(val, samples=3)[1], torch.zeros(len(val), 1))


# -- TensorBoard and exact resume with everything on --------------------------------------------------------
class StopAt:
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer: Trainer, loss: float) -> None:
        trainer.should_stop = trainer.should_stop or trainer.global_step == self.step


ALL_ON = dict(l1=1e-4, l2=1e-3, max_norm=1.5, grad_clip=1.0, grad_accum=2, schedule="cosine_restarts", restart_steps=3,
              optimizer="nadam", activation_checkpointing=True, tensorboard=True, checkpoint_every=4, log_every=2,
              epochs=4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_exact_resume_with_every_feature_on(tmp_path: Path, precision: str) -> None:
    whole = fit(RunDir(tmp_path / "whole"), precision=precision, **ALL_ON)
    fit(RunDir(tmp_path / "resumed"), callbacks=[StopAt(6)], precision=precision, **ALL_ON)  # mid-epoch 2
    resumed = fit(RunDir(tmp_path / "resumed"), precision=precision, **ALL_ON)
    assert_same_weights(weights(resumed), weights(whole))
    assert resumed.scaler.state_dict() == whole.scaler.state_dict()
    resumed_epochs = [(r["epoch"], r["val_loss"]) for r in RunDir(tmp_path / "resumed").metrics("epoch")]
    whole_epochs = [(r["epoch"], r["val_loss"]) for r in RunDir(tmp_path / "whole").metrics("epoch")]
    assert resumed_epochs == whole_epochs


def test_tensorboard_scalars_lr_and_weight_histograms(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = fit(RunDir(tmp_path / "run"), callbacks=[StopAt(5)], tensorboard=True, log_every=1, checkpoint_every=5)
    trainer = fit(RunDir(tmp_path / "run"), tensorboard=True, log_every=1, checkpoint_every=5)  # resumed at step 5
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    steps = [e.step for e in events.Scalars("step/loss")]
    assert sorted(steps) == list(range(1, trainer.global_step + 1))  # each step once, even across the resume
    assert [e.value for e in events.Scalars("step/lr")] == pytest.approx([0.05] * trainer.global_step)
    assert {"epoch/val_loss", "epoch/train_loss", "epoch/lr", "epoch/train_time_s"} <= set(tags["scalars"])
    histograms = [t for t in tags["histograms"] if t.startswith("weights/")]
    assert "weights/head.weight" in histograms and len(histograms) == len(trainer.model.state_dict())
    assert len(events.Histograms("weights/head.weight")) == 3  # one per epoch


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compile_with_inductor_trains_like_eager() -> None:
    """The default backend (inductor, C++ code generation on CPU): minutes on a busy machine, so in the slow tier."""
    torch._dynamo.reset()
    compiled = fit(compile=True, epochs=2)
    assert compiled.forward_module.compiled is not None, compiled.forward_module.problem
    assert_same_weights(weights(compiled), weights(fit(epochs=2)), atol=1e-5)
