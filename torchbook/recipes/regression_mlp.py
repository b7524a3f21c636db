"""`regression-mlp`: the book's regression MLP on California housing (chapter 10), 8-50-40-1.

Data: the book's housing archive without its categorical column, turned into the eight features of
scikit-learn's `fetch_california_housing` that the chapter uses (median income, house age, average rooms,
average bedrooms, population, average occupancy, latitude, longitude; missing bedroom counts imputed with the
training median), target in units of $100,000. Split as the book does: 25% test, then 25% of the rest for
validation (seed 42). A linear regression on the same features and split is the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torchmetrics
from torch.utils.data import TensorDataset

import torchbook
from torchbook.data.housing import housing_features
from torchbook.data.sources import HOUSING_SOURCE, load_housing
from torchbook.data.splits import split_indices, split_record
from torchbook.devices import device_of
from torchbook.hub import save_model
from torchbook.models.mlp import MLP, MLPConfig
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir
from torchbook.train import TrainConfig, Trainer

NAME = "regression-mlp"
FEATURES = ["MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude", "Longitude"]
BOOK_VAL_RMSE = 0.639  # the chapter's PyTorch MLP with mini-batches (batch 32, lr 0.02)
BOOK_SKLEARN_TEST_RMSE = 0.533  # chapter 9's scikit-learn MLPRegressor (3 x 50)


@dataclass
class Config(TrainConfig):
    hidden: list[int] = field(default_factory=lambda: [50, 40])
    activation: str = "relu"
    epochs: int = 20
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.02
    restore_best: bool = False  # the book measures the model after its 20 epochs, not the best epoch's weights
    limit: int = 0  # use only this many training districts (0 = all), for smoke runs

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"epochs": 2, "limit": 2000},
        "quick": {"epochs": 20},
        "book": {},
    }


@dataclass
class Prepared:
    splits: dict[str, np.ndarray]
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    impute: dict[str, float]

    def dataset(self, split: str) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.x[split]), torch.from_numpy(self.y[split]))


def prepare(config: Config) -> Prepared:
    frame = load_housing()
    features = housing_features(frame)
    target = (frame["median_house_value"] / 100_000).to_numpy(np.float32)[:, None]
    splits = split_indices(len(frame), val=0.1875, test=0.25, seed=config.seed)
    if config.limit:
        splits["train"] = splits["train"][: config.limit]
    impute = {name: float(features[name].iloc[splits["train"]].median()) for name in FEATURES}
    filled = features.fillna(impute).to_numpy(np.float32)
    return Prepared(splits, {k: filled[v] for k, v in splits.items()}, {k: target[v] for k, v in splits.items()}, impute)


def rmse_metric() -> dict[str, Any]:
    return {"rmse": lambda: torchmetrics.MeanSquaredError(squared=False)}


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    report = Report("Regression MLP on California housing", NAME, "10", HOUSING_SOURCE)
    prep = prepare(config)
    run.write_json("split.json", split_record(prep.splits, HOUSING_SOURCE, config.seed, impute=prep.impute))
    torch.manual_seed(config.seed)
    model = MLP(MLPConfig(len(FEATURES), 1, list(config.hidden), config.activation))
    model.standardize.fit(torch.from_numpy(prep.x["train"]))  # type: ignore[operator]
    trainer = Trainer(model, config, run, prep.dataset("train"), prep.dataset("val"),
                      criterion=torch.nn.MSELoss(), metrics=rmse_metric())
    trainer.fit()
    val, test = trainer.evaluate(prep.dataset("val")), trainer.evaluate(prep.dataset("test"))
    save_model(model, run.model_dir, extra={"features": FEATURES, "impute": prep.impute, "target_unit": 100_000})

    from sklearn.linear_model import LinearRegression

    linear = LinearRegression().fit(prep.x["train"], prep.y["train"])
    linear_rmse = float(np.sqrt(np.mean((linear.predict(prep.x["test"]) - prep.y["test"]) ** 2)))
    results = {"val_rmse": val["rmse"], "test_rmse": test["rmse"], "baseline_linear_test_rmse": linear_rmse}
    run.write_json("results.json", results)
    run.log(kind="eval", **results)

    predictions = trainer.predict(prep.dataset("test")).numpy().ravel()
    scatter_plot(run.plots / "predictions.png", prep.y["test"].ravel(), predictions)
    report.compare("validation RMSE ($100k)", val["rmse"], BOOK_VAL_RMSE, "book: PyTorch MLP, batch 32, lr 0.02")
    report.compare("test RMSE ($100k)", test["rmse"], None,
                   f"the book prints no test RMSE for this model (chapter 9's scikit-learn MLP, another model: "
                   f"{BOOK_SKLEARN_TEST_RMSE})")
    report.compare("linear-regression baseline, test RMSE", linear_rmse, None, "same features, same split")
    verdict = "beats" if test["rmse"] < linear_rmse else "does NOT beat"
    report.text("Verdict", f"The MLP {verdict} the linear baseline on the test set ({test['rmse']:.4f} vs {linear_rmse:.4f}).")
    report.table("Data split", ["split", "districts"], [[k, len(v)] for k, v in prep.splits.items()])
    report.image("Learning curves", run.plots / "learning_curves.png", run.path)
    report.image("Test predictions", run.plots / "predictions.png", run.path)
    report.write(run.path)
    return run


def scatter_plot(path: Any, truth: np.ndarray, predicted: np.ndarray) -> None:
    from torchbook.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(truth, predicted, s=3, alpha=0.3)
    ax.plot([0, 5.2], [0, 5.2], color="black", linewidth=1)
    ax.set_xlabel("true median value ($100k)")
    ax.set_ylabel("predicted ($100k)")
    ax.set_title("Test set predictions")
    save_figure(fig, path)


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, float]:
    """Reload the saved model and compute its test RMSE again."""
    run = RunDir.open(run_dir)
    prep = prepare(run.load_config(Config))
    model = torchbook.load(run.path, map_location=device).model
    with torch.no_grad():
        predictions = model(torch.from_numpy(prep.x["test"]).to(device_of(model))).cpu().numpy()
    return {"test_rmse": float(np.sqrt(np.mean((predictions - prep.y["test"]) ** 2)))}


RECIPE = Recipe(NAME, "10", "California housing regression MLP (8-50-40-1) beside a linear-regression baseline",
                Config, run, evaluate)
