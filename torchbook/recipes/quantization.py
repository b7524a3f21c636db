"""`quantization`: the book's Appendix B on chapter 10's Fashion-MNIST MLP (784-300-100-10): post-training
dynamic and static quantization and quantization-aware training, at 8 and 4 bits, against float32.

The float32 model trains with the chapter-10 settings through the `Trainer` (resumable). Then, each on a copy:

- PTQ dynamic 8-bit (torchao `Int8DynamicActivationInt8WeightConfig`): int8 weights per output row, each
  input row's scale computed at run time;
- PTQ static 8-bit (torchao `Int8StaticActivationInt8WeightConfig`): int8 weights and activations per tensor,
  the activation scales calibrated beforehand on training images;
- PTQ dynamic 4-bit weights (torchao `Int8DynamicActivationIntxWeightConfig`, int4 weights per row);
- PTQ static 8-bit and 4-bit, ours (`torchbook.nn.quantization.FakeQuantLinear`: weights symmetric per row,
  activations asymmetric per tensor, ranges calibrated): torchao has no static activation quantization below 8
  bits, and one quantizer for PTQ and QAT makes the QAT row's gain attributable to training alone;
- QAT with torchao (`QATConfig` prepare, fine-tune, convert) for its int4-weight scheme;
- QAT 4-bit, ours: the static 4-bit model fine-tuned through its fake quantization (straight-through gradients)
  for `qat_epochs` with the same Trainer, beside a control: the float model trained for the same extra epochs
  (what QAT gains over static 4-bit is partly just more training; the control separates the two);
- weight-only int8 and int4 (`torchbook.nn.quantized`'s Int8Linear/Int4Linear, the decoding layers of
  chapter 17), inputs zero-padded to their 32-wide groups.

The report's table gives each one's test accuracy, size on disk (torch.save of what it stores; for our fake-quant
models, the integer codes and scales a deployment would store) and CPU latency for 1 and 256 images. Our
fake-quantized models compute in float32, so their latency is a simulation's, not an integer kernel's.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

import torchbook
from torchbook.data.images import IMAGE_DATASETS, ImageData, image_split
from torchbook.data.splits import split_record
from torchbook.hub import save_model
from torchbook.models.mlp import MLP, MLPConfig
from torchbook.nn.number_formats import formats_table
from torchbook.nn.quantization import calibrate, fake_quantize_linear_layers, integer_state
from torchbook.nn.quantized import Int4Linear, Int8Linear
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train import Trainer
from torchbook.train.config import TrainConfig

NAME = "quantization"
CONTROL = "float32 + the same extra epochs (control)"
BOOK_VAL_ACCURACY = 0.872  # chapter 10's float32 MLP on Fashion-MNIST; the appendix prints no quantized accuracies
log = logging.getLogger(__name__)


@dataclass
class Config(TrainConfig):
    data: Literal["fashion-mnist", "digits"] = "fashion-mnist"
    hidden: list[int] = field(default_factory=lambda: [300, 100])
    epochs: int = 20  # chapter 10's settings
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    qat_epochs: int = 2  # quantization-aware fine-tuning of the 4-bit model
    qat_lr: float = 0.0005
    calibration_images: int = 2048  # training images whose activation ranges set the static scales
    latency_runs: int = 50  # timed forward passes per model and batch size (the median is reported)
    limit: int = 0  # use only this many training images (0 = all), for smoke runs

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"epochs": 1, "qat_epochs": 1, "limit": 2000, "calibration_images": 256, "latency_runs": 5},
        "quick": {"epochs": 3, "qat_epochs": 1, "latency_runs": 20},
        "book": {},
    }


def load_split(config: Config) -> tuple[ImageData, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Fashion-MNIST: the book's split (the last 5,000 training images validate, the official 10,000 test);
    digits: stratified 65/15/20. Returns the data, the split and the test images and labels."""
    data = IMAGE_DATASETS[config.data]()
    splits, test_x, test_y = image_split(data, config.seed, config.limit)
    return data, splits, test_x, test_y


def import_torchao() -> Any:
    """torchao's quantization API. Its wheel also carries CUDA kernels that cannot load into a CPU build of torch;
    it says so in warnings at import, which are silenced here (the CPU paths used do not need them)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torchao.quantization

    return torchao.quantization


def stored_bytes(state: dict[str, Any]) -> int:
    """Size on disk of what a model stores (torch.save, which also holds torchao's quantized tensors)."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def latency_ms(model: Any, images: Any, runs: int) -> float:
    """Median wall-clock milliseconds of one forward pass on `images` (after two warm-up passes)."""
    import torch

    with torch.inference_mode():
        for _ in range(2):
            model(images)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def accuracy(model: Any, images: Any, labels: np.ndarray) -> float:
    import torch

    with torch.inference_mode():
        device = next((p.device for p in model.parameters()), torch.device("cpu"))  # quantized copies: the CPU
        predictions = torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(1024)])
    return float((predictions.numpy() == labels).mean())


def torchao_variants(model: Any, calibration: Any) -> dict[str, Any]:
    """The torchao post-training quantizations, each on its own copy of the float model."""
    from torch import nn

    ao = import_torchao()
    from torchao.quantization.granularity import PerTensor

    out = {}
    dynamic8 = copy.deepcopy(model)
    ao.quantize_(dynamic8, ao.Int8DynamicActivationInt8WeightConfig())
    out["PTQ dynamic 8-bit (torchao)"] = dynamic8

    static8 = copy.deepcopy(model)
    inputs = calibration_inputs(model, calibration)
    for name, module in list(static8.named_modules()):
        if isinstance(module, nn.Linear):  # activation scale: max |input| / 127 over the calibration images
            scale = (inputs[name].abs().max() / 127).reshape(1, 1)
            ao.quantize_(module, ao.Int8StaticActivationInt8WeightConfig(act_quant_scale=scale, granularity=PerTensor()),
                         filter_fn=lambda m, _: isinstance(m, nn.Linear))
    out["PTQ static 8-bit (torchao)"] = static8

    dynamic4 = copy.deepcopy(model)
    ao.quantize_(dynamic4, torchao_int4_config())
    out["PTQ dynamic, 4-bit weights (torchao)"] = dynamic4
    return out


def torchao_int4_config() -> Any:
    """torchao's CPU 4-bit scheme: int4 weights, one scale per output row, int8 activations quantized at run time
    (its `Int4WeightOnlyConfig` leaves a CPU model unchanged)."""
    import torch

    ao = import_torchao()
    from torchao.quantization.granularity import PerAxis

    return ao.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,  # type: ignore[attr-defined]
                                                    weight_granularity=PerAxis(0))


def torchao_qat(model: Any, fine_tune: Any) -> Any:
    """torchao's QAT: `prepare` swaps the linear layers for fake-quantized ones (the int4 scheme above), the model
    fine-tunes, `convert` makes it the quantized model."""
    from torchao.quantization.qat import QATConfig

    ao = import_torchao()
    prepared = copy.deepcopy(model)
    ao.quantize_(prepared, QATConfig(torchao_int4_config(), step="prepare"))
    tuned = fine_tune(prepared)
    ao.quantize_(tuned, QATConfig(torchao_int4_config(), step="convert"))
    return tuned


def calibration_inputs(model: Any, calibration: Any) -> dict[str, Any]:
    """The input each linear layer of `model` sees on the calibration images, by layer name."""
    import torch
    from torch import nn

    seen: dict[str, Any] = {}
    hooks = [m.register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, args[0].detach()))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.inference_mode():
        model(calibration)
    for hook in hooks:
        hook.remove()
    return seen


def weight_only(model: Any, bits: int) -> Any:
    """A copy of `model` whose linear layers are `Int8Linear`/`Int4Linear` (weight-only, groups of 32 inputs);
    inputs are zero-padded to a whole number of groups (784 -> 800, 300 -> 320, 100 -> 128), the padded
    weights being zeros."""
    import torch.nn.functional as F
    from torch import nn

    class PadInputs(nn.Module):
        def __init__(self, extra: int):
            super().__init__()
            self.extra = extra

        def forward(self, x: Any) -> Any:
            return F.pad(x, (0, self.extra))

    quantized = copy.deepcopy(model)
    for name, module in list(quantized.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        extra = -module.in_features % 32
        padded = nn.Linear(module.in_features + extra, module.out_features)
        padded.weight.data = F.pad(module.weight.detach(), (0, extra))
        padded.bias.data = module.bias.detach().clone()
        layer = (Int4Linear if bits == 4 else Int8Linear).from_linear(padded, group_size=32)
        parent, _, child = name.rpartition(".")
        setattr(quantized.get_submodule(parent) if parent else quantized, child, nn.Sequential(PadInputs(extra), layer))
    return quantized


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    import torch  # heavy: `torchbook list` reads recipes without importing them, but a plain import stays light
    import torchmetrics
    from torch.utils.data import TensorDataset

    from torchbook.plots import plt, save_figure
    run = RunDir.start(run_dir, NAME, config)
    data, splits, test_x, test_y = load_split(config)
    report = Report(f"Quantization of the chapter-10 MLP on {data.name}", NAME, "B (appendix)", data.source)
    run.write_json("split.json", split_record(splits, data.source, config.seed, dataset=data.name))

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))

    train = tensors(data.images[splits["train"]], data.labels[splits["train"]])
    val = tensors(data.images[splits["val"]], data.labels[splits["val"]])
    metrics = {"accuracy": lambda: torchmetrics.classification.MulticlassAccuracy(num_classes=len(data.classes),
                                                                                  average="micro")}
    torch.manual_seed(config.seed)
    n_pixels = int(np.prod(data.images.shape[1:]))
    model = MLP(MLPConfig(n_pixels, len(data.classes), list(config.hidden), "relu", standardize=False))
    trainer = Trainer(model, config, run, train, val, criterion=torch.nn.CrossEntropyLoss(), metrics=metrics)
    trainer.fit()
    float_val = trainer.evaluate(val)["accuracy"]  # on the training device, before the model moves to the CPU
    trainer.model.cpu().eval()  # quantized CPU inference from here on
    save_model(model, run.model_dir, extra={"classes": data.classes, "image_shape": list(data.images.shape[1:])})

    test_images = torch.from_numpy(np.ascontiguousarray(test_x))
    generator = np.random.default_rng(config.seed)
    calibration_index = generator.choice(len(splits["train"]), min(config.calibration_images, len(splits["train"])),
                                         replace=False)
    calibration = train.tensors[0][torch.from_numpy(calibration_index)]

    # Each variant: (model, what it stores, how it was made).
    variants: dict[str, tuple[Any, dict[str, Any], str]] = {"float32": (model, model.state_dict(), "trained")}
    for name, quantized in torchao_variants(model, calibration).items():
        variants[name] = (quantized, quantized.state_dict(), "torchao")
    for bits in (8, 4):
        static = calibrate(fake_quantize_linear_layers(copy.deepcopy(model), bits, bits), list(calibration.split(256)))
        variants[f"PTQ static {bits}-bit (ours, W{bits}A{bits})"] = (static, integer_state(static), "fake-quant")
    static4 = variants["PTQ static 4-bit (ours, W4A4)"][0]

    def fine_tune(start: Any) -> Any:
        """`qat_epochs` more epochs at `qat_lr` with the Trainer (no run folder: the float model's is kept)."""
        tune_config = dataclasses.replace(config, epochs=config.qat_epochs, lr=config.qat_lr, patience=0,
                                          checkpoint_every=0)
        tuner = Trainer(copy.deepcopy(start).train(), tune_config, None, train, val,
                        criterion=torch.nn.CrossEntropyLoss(), metrics=metrics)
        return tuner.fit().cpu().eval()

    qat = fine_tune(static4)
    variants["QAT 4-bit (ours, W4A4)"] = (qat, integer_state(qat), "fake-quant")
    ao_qat = torchao_qat(model, fine_tune)
    variants["QAT, 4-bit weights (torchao)"] = (ao_qat, ao_qat.state_dict(), "torchao")
    # The control: the float model trained for the same extra epochs, so QAT's gain is not mistaken for training's.
    control = fine_tune(model)
    variants[CONTROL] = (control, control.state_dict(), "trained")
    for bits in (8, 4):
        wo = weight_only(model, bits)
        variants[f"weight-only int{bits} (Int{bits}Linear)"] = (wo, wo.state_dict(), "torchbook.nn.quantized")

    rows: list[dict[str, Any]] = []
    table: list[list[Any]] = []
    float_bytes = stored_bytes(model.state_dict())
    one, batch = test_images[:1], test_images[:256]
    for name, (variant, state, kind) in variants.items():
        variant.eval()
        size = stored_bytes(state)
        row: dict[str, Any] = {"variant": name, "kind": kind, "test_accuracy": accuracy(variant, test_images, test_y),
               "bytes": size, "size_ratio": float_bytes / size,
               "latency_ms_1": latency_ms(variant, one, config.latency_runs),
               "latency_ms_256": latency_ms(variant, batch, config.latency_runs)}
        rows.append(row)
        log.info("%s: %s", name, row)
    base = rows[0]
    for row in rows:
        simulated = " (simulated in float32)" if row["kind"] == "fake-quant" else ""
        table.append([row["variant"], f"{row['test_accuracy']:.4f}",
                      f"{row['test_accuracy'] - base['test_accuracy']:+.4f}", f"{row['bytes'] / 1024:,.0f} KiB",
                      f"{row['size_ratio']:.1f}x", f"{row['latency_ms_1']:.3f}{simulated}",
                      f"{row['latency_ms_256']:.2f}", f"{base['latency_ms_256'] / row['latency_ms_256']:.2f}x"])
    by_name = {r["variant"]: r for r in rows}
    static4_accuracy = by_name["PTQ static 4-bit (ours, W4A4)"]["test_accuracy"]
    qat_accuracy = by_name["QAT 4-bit (ours, W4A4)"]["test_accuracy"]
    figures = {"static4_accuracy_loss": base["test_accuracy"] - static4_accuracy,
               "qat4_gain_over_static4": qat_accuracy - static4_accuracy,
               "qat4_vs_float32_control": qat_accuracy - by_name[CONTROL]["test_accuracy"]}
    results = {"float32_val_accuracy": float_val, "variants": rows, **figures, "dataset": data.name,
               "test_images": len(test_y)}
    run.write_json("results.json", results)
    run.log(kind="eval", float32_val_accuracy=float_val, **figures)

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        ax.scatter(row["bytes"] / 1024, row["test_accuracy"], s=30)
        ax.annotate(row["variant"], (row["bytes"] / 1024, row["test_accuracy"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (KiB, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against size")
    ax.grid(alpha=0.3)
    save_figure(fig, run.plots / "accuracy_vs_size.png")

    book_note = "book (chapter 10): validation" if data.name == "fashion-mnist" else "book's figure is for Fashion-MNIST"
    report.compare("float32 validation accuracy", float_val, BOOK_VAL_ACCURACY if data.name == "fashion-mnist" else None,
                   book_note)
    report.compare("static 4-bit PTQ (W4A4): test accuracy lost against float32", figures["static4_accuracy_loss"],
                   None, "the appendix prints no accuracy figures")
    report.compare("QAT 4-bit: test accuracy gained over static 4-bit PTQ", figures["qat4_gain_over_static4"], None,
                   f"{config.qat_epochs} epoch(s) of fine-tuning through the fake quantization")
    report.compare("QAT 4-bit against float32 trained the same extra epochs", figures["qat4_vs_float32_control"],
                   None, "the part of QAT's gain that is not just more training")
    report.table(f"Float32 against quantized models ({len(test_y):,} test images)",
                 ["model", "test accuracy", "vs float32", "size", "smaller by", "ms, 1 image", "ms, 256 images",
                  "speed-up (256)"], table)
    report.text("How to read it", (
        "Sizes are torch.save of what each model stores: float32 weights; torchao's quantized tensors (its 4-bit "
        "weights are held unpacked, one per int8, so they take a byte each); for our fake-quantized models, the "
        "integer codes (4-bit codes two to a byte) and float32 scales an integer deployment would store; "
        "Int4Linear/Int8Linear with their group scales. Latency is the median on this CPU for one batch; our "
        "fake-quantized models run in float32 with rounding added, so they are slower, not faster: they measure "
        "accuracy, not speed. At this model's size (0.27M weights) a forward pass is dominated by overheads, so "
        "integer kernels gain little; weight-only layers pay off when reading the weights dominates (decoding an "
        "LLM, chapter 17)."))
    report.table("Number formats (Figure B-1), from torch.finfo", *number_format_rows())
    report.table("Data split", ["split", "images"], [[k, len(v)] for k, v in splits.items()])
    report.image("Learning curves (float32)", run.plots / "learning_curves.png", run.path)
    report.image("Accuracy against size", run.plots / "accuracy_vs_size.png", run.path)
    report.write(run.path)
    return run


def number_format_rows() -> tuple[list[str], list[list[Any]]]:
    headers = ["format", "bits (sign, exponent, mantissa)", "largest", "smallest normal", "epsilon"]
    rows = [[r["format"], f"{r['bits']} (1, {r['exponent']}, {r['mantissa']})", f"{r['max']:.4g}",
             f"{r['smallest_normal']:.4g}", f"{r['epsilon']:.4g}"] for r in formats_table()]
    return headers, rows


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, float]:
    """Reload the saved float32 model and measure it on the run's test set."""
    import torch

    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    _, _, test_x, test_y = load_split(config)
    images = torch.from_numpy(np.ascontiguousarray(test_x))
    return {"test_accuracy": accuracy(torchbook.load(run.path, map_location=device).model, images, test_y), "test_images": len(test_y)}


RECIPE = Recipe(NAME, "B", "Quantization of the ch. 10 MLP: PTQ dynamic/static, QAT, 8/4-bit, weight-only (torchao + ours)",
                Config, run, evaluate)
