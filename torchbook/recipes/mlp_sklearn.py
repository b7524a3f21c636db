"""`mlp-sklearn`: chapter 9's first neural networks with scikit-learn.

The perceptron on iris (setosa or not, from the petal length and width), shown to be SGD with the perceptron
loss; a regression MLP (three hidden layers of 50, early stopping) on California housing; a classification
MLP on iris. Housing: the book loads scikit-learn's `fetch_california_housing`, which downloads; we compute the
same eight features from the book's own housing archive (whose 207 missing bedroom counts the pipeline
imputes with the training median, where scikit-learn's copy has the values), split as the book splits (25%
test, then 25% of the rest for validation, seed 42), target in units of $100,000.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from sklearn.datasets import load_iris
from sklearn.impute import SimpleImputer
from sklearn.linear_model import Perceptron, SGDClassifier
from sklearn.metrics import r2_score, root_mean_squared_error
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from torchbook.data.housing import housing_features
from torchbook.data.sources import HOUSING_SOURCE, load_housing
from torchbook.hub import load_estimator, save_estimator
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir

NAME = "mlp-sklearn"
# Chapter 9's printed figures: the perceptron's two predictions, the regression MLP's test RMSE, and its
# `best_validation_score_` (the R2 on the 10% of the training set early stopping holds out: the book prints no
# test R2).
BOOK = {"perceptron_predictions": [True, False], "mlp_test_rmse": 0.533, "mlp_best_early_stopping_r2": 0.7915}


@dataclass
class Config:
    seed: int = 42
    hidden: list[int] = field(default_factory=lambda: [50, 50, 50])
    max_iter: int = 200
    classifier_hidden: list[int] = field(default_factory=lambda: [5])
    limit: int = 0  # train the regression MLP on only this many districts (0 = all)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"limit": 2000, "max_iter": 30},
        "quick": {},
        "book": {},
    }


def perceptron_study(seed: int = 42) -> dict[str, Any]:
    """Rosenblatt's perceptron on iris petals, and the same model as SGD with the perceptron loss."""
    iris = load_iris(as_frame=True)
    x = iris.data[["petal length (cm)", "petal width (cm)"]].to_numpy()
    y = (iris.target == 0).to_numpy()  # Iris setosa
    perceptron = Perceptron(random_state=seed).fit(x, y)
    sgd = SGDClassifier(loss="perceptron", penalty=None, learning_rate="constant", eta0=1,
                        random_state=seed).fit(x, y)
    return {"perceptron_predictions": perceptron.predict([[2, 0.5], [3, 1]]).tolist(),
            "perceptron_train_accuracy": float(perceptron.score(x, y)),
            "perceptron_equals_sgd": bool(np.allclose(perceptron.coef_, sgd.coef_)
                                          and np.allclose(perceptron.intercept_, sgd.intercept_)),
            "perceptron_coef": perceptron.coef_.ravel().tolist(), "perceptron_intercept": float(perceptron.intercept_[0])}


def housing_splits(seed: int = 42, limit: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    frame = load_housing()
    x = housing_features(frame).to_numpy()
    y = (frame["median_house_value"] / 100_000).to_numpy()
    x_full, x_test, y_full, y_test = train_test_split(x, y, random_state=seed)
    x_train, x_valid, y_train, y_valid = train_test_split(x_full, y_full, random_state=seed)
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    return {"train": (x_train, y_train), "valid": (x_valid, y_valid), "test": (x_test, y_test)}


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    report = Report("Neural networks with scikit-learn: perceptron and MLPs", NAME, "9",
                    HOUSING_SOURCE + " (regression MLP); iris (perceptron, classifier)")
    results: dict[str, Any] = perceptron_study(config.seed)
    splits = housing_splits(config.seed, config.limit)
    run.write_json("split.json", {"source": HOUSING_SOURCE, "seed": config.seed,
                                  "sizes": {k: len(v[1]) for k, v in splits.items()},
                                  "split": "train_test_split(seed) twice: 25% test, then 25% of the rest validation"})
    (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = splits.values()
    regressor = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                              MLPRegressor(hidden_layer_sizes=config.hidden, early_stopping=True,
                                           max_iter=config.max_iter, random_state=config.seed))
    regressor.fit(x_train, y_train)
    mlp = regressor[-1]
    results.update({
        "mlp_valid_rmse": root_mean_squared_error(y_valid, regressor.predict(x_valid)),
        "mlp_test_rmse": root_mean_squared_error(y_test, regressor.predict(x_test)),
        "mlp_test_r2": r2_score(y_test, regressor.predict(x_test)), "mlp_epochs": int(mlp.n_iter_),
        "mlp_best_early_stopping_r2": float(mlp.best_validation_score_),
    })
    from sklearn.linear_model import LinearRegression

    linear = make_pipeline(SimpleImputer(strategy="median"), LinearRegression()).fit(x_train, y_train)
    results["linear_test_rmse"] = root_mean_squared_error(y_test, linear.predict(x_test))

    iris = load_iris()
    xi_train, xi_test, yi_train, yi_test = train_test_split(iris.data, iris.target, random_state=config.seed,
                                                            stratify=iris.target)
    classifier = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=config.classifier_hidden,
                                                               max_iter=10_000, random_state=config.seed))
    results["mlp_classifier_iris_test_accuracy"] = float(classifier.fit(xi_train, yi_train).score(xi_test, yi_test))
    save_estimator(regressor, run.model_dir, extra={"recipe": NAME, "target_unit": 100_000,
                                                    "inputs": ["MedInc", "HouseAge", "AveRooms", "AveBedrms",
                                                               "Population", "AveOccup", "Latitude", "Longitude"]})
    run.write_json("results.json", results)
    run.log(kind="eval", **{k: v for k, v in results.items() if isinstance(v, (int, float))})

    from torchbook.plots import line_plot

    line_plot(run.plots / "mlp_loss.png", {"training loss": (range(1, len(mlp.loss_curve_) + 1), mlp.loss_curve_)},
              "MLPRegressor training loss (half squared error)", "epoch", "loss")
    full = not config.limit
    report.compare("perceptron predictions for petals (2, 0.5) and (3, 1)", str(results["perceptron_predictions"]),
                   str(BOOK["perceptron_predictions"]))
    report.compare("perceptron is SGD with the perceptron loss (same weights)", results["perceptron_equals_sgd"], True)
    for key, label in (("mlp_test_rmse", "regression MLP (3 x 50): test RMSE ($100k)"),
                       ("mlp_best_early_stopping_r2", "regression MLP: best_validation_score_ (R2, early-stopping "
                                                      "validation)")):
        ours, book = results[key], BOOK[key]
        note = (f"{100 * (ours - book) / book:+.1f}%; ours imputes 207 missing bedroom counts" if full
                else f"on {config.limit:,} districts, {config.max_iter} epochs at most")
        report.compare(label, round(ours, 4), book, note)
    report.compare("regression MLP: test R2", round(results["mlp_test_r2"], 4), None, "the book prints no test R2")
    report.compare("regression MLP: validation RMSE", round(results["mlp_valid_rmse"], 4), None,
                   f"{results['mlp_epochs']} epochs (early stopping on 10% of the training set)")
    report.compare("linear regression: test RMSE (baseline)", round(results["linear_test_rmse"], 4), None, "same split")
    report.compare("MLP classifier on iris: test accuracy", round(results["mlp_classifier_iris_test_accuracy"], 4), None,
                   f"hidden layers {config.classifier_hidden}, 38 test flowers")
    report.table("Data split (housing)", ["split", "districts"], [[k, len(v[1])] for k, v in splits.items()])
    report.image("Regression MLP training loss", run.plots / "mlp_loss.png", run.path)
    report.write(run.path)
    return run


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, float]:
    """Reload the saved regression MLP and measure its test RMSE and R2 again on the run's split (scikit-learn
    runs on the CPU whatever `device` says)."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    x_test, y_test = housing_splits(config.seed, config.limit)["test"]
    predictions = load_estimator(run.model_dir).predict(x_test)
    return {"mlp_test_rmse": root_mean_squared_error(y_test, predictions), "mlp_test_r2": r2_score(y_test, predictions)}


RECIPE = Recipe(NAME, "9", "Perceptron on iris, scikit-learn MLP regressor (housing) and classifier", Config, run,
                evaluate)
