"""`trees-ensembles`: chapters 5 and 6, decision trees and ensemble learning.

A depth-2 tree on iris petals (its root split, its class probabilities for a flower), the effect of
min_samples_leaf on a small moons set, then the ensembles on moons (500 points, noise 0.3, split 375 / 125 with
seed 42): hard and soft voting over logistic regression, a random forest and an SVC; bagging with its
out-of-bag score; random forest and extra-trees; AdaBoost; gradient boosting by hand and with early stopping;
histogram-based boosting on the housing archive (when the mirror has it); stacking.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sklearn.datasets import load_iris, make_moons
from sklearn.ensemble import (
    AdaBoostClassifier,
    BaggingClassifier,
    ExtraTreesClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    StackingClassifier,
    VotingClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor, export_text

from torchbook.data.housing import TARGET, stratified_split
from torchbook.data.sources import load_housing
from torchbook.errors import DataUnavailable
from torchbook.hub import save_estimator
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir

NAME = "trees-ensembles"
SOURCE = "iris (Fisher, 1936) and make_moons, bundled with scikit-learn; the book's housing archive for boosting"
BOOK = {
    "iris_root_threshold": 2.45, "iris_proba": (0.0, 0.907, 0.093),
    "moons_tree_unregularized": 0.898, "moons_tree_min_leaf5": 0.92,
    "logistic": 0.864, "random_forest": 0.896, "svc": 0.896, "hard_voting": 0.912, "soft_voting": 0.92,
    "bagging_oob": 0.896, "bagging_test": 0.92, "stacking": 0.928, "gbrt_early_stopping_trees": 53,
}
BOOK_GBRT_BY_HAND = (0.57356534, 0.0405142, 0.66914249)  # the 3 trees' predictions at x = -0.4, 0, 0.5, as printed
BOOK_HGB_CV_RMSE = 47_600  # "about 47,600": histogram boosting on housing, 10-fold CV


@dataclass
class Config:
    seed: int = 42
    moons_samples: int = 500
    moons_noise: float = 0.30
    bagging_estimators: int = 500
    forest_estimators: int = 500  # the random forest and extra-trees of section "Random Forests"
    stacking_cv: int = 5
    boosting_housing: bool = True  # histogram boosting on the housing archive (needs it; skipped with a note if not)
    n_jobs: int = -1

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"bagging_estimators": 50, "forest_estimators": 50, "stacking_cv": 3, "boosting_housing": False,
                  "n_jobs": 1},
        "quick": {},
        "book": {},
    }


def moons(config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = make_moons(n_samples=config.moons_samples, noise=config.moons_noise, random_state=config.seed)
    return train_test_split(x, y, random_state=config.seed)


def voters(seed: int, probability: bool = False) -> list[tuple[str, Any]]:
    """The three voters. Soft voting and stacking use the SVC's probabilities, as the book does (scikit-learn 1.9
    deprecates `SVC(probability=True)`; we keep the book's model and silence that warning)."""
    return [("lr", LogisticRegression(random_state=seed)), ("rf", RandomForestClassifier(random_state=seed)),
            ("svc", SVC(probability=probability, random_state=seed))]


def iris_tree(seed: int = 42) -> tuple[DecisionTreeClassifier, dict[str, Any]]:
    """The depth-2 tree on petal length and width (chapter 5)."""
    iris = load_iris(as_frame=True)
    x = iris.data[["petal length (cm)", "petal width (cm)"]].to_numpy()
    tree = DecisionTreeClassifier(max_depth=2, random_state=seed).fit(x, iris.target)
    return tree, {
        "iris_root_feature": ["petal length", "petal width"][tree.tree_.feature[0]],
        "iris_root_threshold": float(tree.tree_.threshold[0]),
        "iris_proba": tree.predict_proba([[5, 1.5]])[0].tolist(),
        "iris_tree_text": export_text(tree, feature_names=["petal length (cm)", "petal width (cm)"]),
    }


def moons_regularization(seed: int = 42) -> dict[str, float]:
    """An unregularized tree against min_samples_leaf=5 on 150 noisy moons, scored on 1,000 new ones."""
    x, y = make_moons(n_samples=150, noise=0.2, random_state=seed)
    x_test, y_test = make_moons(n_samples=1000, noise=0.2, random_state=seed + 1)
    plain = DecisionTreeClassifier(random_state=seed).fit(x, y)
    leafy = DecisionTreeClassifier(min_samples_leaf=5, random_state=seed).fit(x, y)
    return {"moons_tree_unregularized": plain.score(x_test, y_test), "moons_tree_min_leaf5": leafy.score(x_test, y_test)}


def gradient_boosting_by_hand(seed: int = 42) -> dict[str, Any]:
    """Three regression trees, each fit to the residuals of the ones before (chapter 6), checked against sklearn."""
    rng = np.random.default_rng(seed)
    x = rng.random((100, 1)) - 0.5
    y = 3 * x[:, 0] ** 2 + 0.05 * rng.standard_normal(100)
    trees, residuals = [], y.copy()
    for _ in range(3):
        tree = DecisionTreeRegressor(max_depth=2, random_state=seed).fit(x, residuals)
        residuals = residuals - tree.predict(x)
        trees.append(tree)
    x_new = np.array([[-0.4], [0.0], [0.5]])
    by_hand = sum(tree.predict(x_new) for tree in trees)
    library = GradientBoostingRegressor(max_depth=2, n_estimators=3, learning_rate=1.0, random_state=seed).fit(x, y)
    early = GradientBoostingRegressor(max_depth=2, learning_rate=0.05, n_estimators=500, n_iter_no_change=10,
                                      random_state=seed).fit(x, y)
    return {"gbrt_by_hand": by_hand.tolist(), "gbrt_sklearn_3_trees": library.predict(x_new).tolist(),
            "gbrt_early_stopping_trees": int(early.n_estimators_)}


def housing_boosting(seed: int = 42) -> dict[str, float]:
    """Histogram-based boosting on the raw housing columns (ocean proximity as a native categorical feature)."""
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OrdinalEncoder

    split = stratified_split(load_housing(), seed=seed)
    x, y = split.train.drop(columns=[TARGET]), split.train[TARGET]
    model = make_pipeline(make_column_transformer((OrdinalEncoder(), ["ocean_proximity"]), remainder="passthrough"),
                          HistGradientBoostingRegressor(categorical_features=[0], random_state=seed))
    scores = -cross_val_score(model, x, y, scoring="neg_root_mean_squared_error", cv=10)
    return {"housing_hgb_cv_rmse": float(scores.mean())}


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`probability` parameter was deprecated", category=FutureWarning)
        return _run(config, run_dir)


def _run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    report = Report("Decision trees and ensemble learning", NAME, "5-6", SOURCE)
    tree, results = iris_tree(config.seed)
    tree_text = results.pop("iris_tree_text")
    results.update(moons_regularization(config.seed))

    x_train, x_test, y_train, y_test = moons(config)
    run.write_json("split.json", {"source": f"make_moons(n_samples={config.moons_samples}, noise={config.moons_noise}, "
                                            f"random_state={config.seed})", "seed": config.seed,
                                  "sizes": {"train": len(x_train), "test": len(x_test)},
                                  "note": "train_test_split(random_state=seed), 25% test"})
    hard = VotingClassifier(voters(config.seed)).fit(x_train, y_train)
    for name, fitted in hard.named_estimators_.items():
        results[{"lr": "logistic", "rf": "random_forest", "svc": "svc"}[name]] = fitted.score(x_test, y_test)
    results["hard_voting"] = hard.score(x_test, y_test)
    soft = VotingClassifier(voters(config.seed, probability=True), voting="soft")
    results["soft_voting"] = soft.fit(x_train, y_train).score(x_test, y_test)

    bagging = BaggingClassifier(DecisionTreeClassifier(), n_estimators=config.bagging_estimators, oob_score=True,
                                n_jobs=config.n_jobs, random_state=config.seed).fit(x_train, y_train)
    results["bagging_oob"], results["bagging_test"] = bagging.oob_score_, bagging.score(x_test, y_test)
    forest = RandomForestClassifier(n_estimators=config.forest_estimators, max_leaf_nodes=16, n_jobs=config.n_jobs,
                                    random_state=config.seed).fit(x_train, y_train)
    results["random_forest_500_leaf16"] = forest.score(x_test, y_test)
    extra = ExtraTreesClassifier(n_estimators=config.forest_estimators, max_leaf_nodes=16, n_jobs=config.n_jobs,
                                 random_state=config.seed).fit(x_train, y_train)
    results["extra_trees_500_leaf16"] = extra.score(x_test, y_test)
    iris = load_iris(as_frame=True)
    iris_forest = RandomForestClassifier(n_estimators=config.forest_estimators, random_state=config.seed)
    iris_forest.fit(iris.data, iris.target)
    results["iris_feature_importances"] = dict(zip(iris.data.columns, iris_forest.feature_importances_.round(3).tolist(),
                                                   strict=True))
    ada = AdaBoostClassifier(DecisionTreeClassifier(max_depth=1), n_estimators=30, learning_rate=0.5,
                             random_state=config.seed).fit(x_train, y_train)
    results["adaboost"] = ada.score(x_test, y_test)
    results.update(gradient_boosting_by_hand(config.seed))
    stacking = StackingClassifier(voters(config.seed, probability=True), final_estimator=RandomForestClassifier(random_state=config.seed + 1),
                                  cv=config.stacking_cv).fit(x_train, y_train)
    results["stacking"] = stacking.score(x_test, y_test)
    if config.boosting_housing:
        try:
            results.update(housing_boosting(config.seed))
        except DataUnavailable as e:
            results["housing_hgb_skipped"] = str(e)
    save_estimator(stacking, run.model_dir, extra={"recipe": NAME, "inputs": ["x1", "x2"], "data": "moons"})
    results = {k: float(v) if isinstance(v, np.floating) else v for k, v in results.items()}
    run.write_json("results.json", results)
    run.log(kind="eval", **{k: v for k, v in results.items() if isinstance(v, (int, float))})
    boundaries_plot(run.plots / "moons_ensembles.png", x_train, y_train,
                    {"decision tree (depth 2, iris)": None, "soft voting": soft, "bagging": bagging, "stacking": stacking})
    write_report(report, run, config, results, tree_text)
    return run


def write_report(report: Report, run: RunDir, config: Config, results: dict[str, Any], tree_text: str) -> None:
    full = config.bagging_estimators == 500 and config.forest_estimators == 500 and config.stacking_cv == 5

    def compare(label: str, key: str, note: str = "") -> None:
        book: Any = BOOK.get(key)
        ours = results[key]
        if isinstance(ours, list):
            ours = "(" + ", ".join(f"{v:.3f}" for v in ours) + ")"
            book = "(" + ", ".join(f"{v:.3f}" for v in book) + ")" if book else None
        elif isinstance(ours, float) and isinstance(book, float):
            ours = round(ours, 3)
            note = "; ".join(n for n in (note, "" if abs(ours - book) < 1e-9 else f"{ours - book:+.3f}") if n)
        report.compare(label, ours, book, note)

    compare("iris tree: root split on petal length (cm)", "iris_root_threshold")
    compare("iris tree: class probabilities for petal (5, 1.5)", "iris_proba")
    compare("moons (150): unregularized tree, test accuracy", "moons_tree_unregularized")
    compare("moons (150): min_samples_leaf=5, test accuracy", "moons_tree_min_leaf5")
    for key, label in (("logistic", "logistic regression"), ("random_forest", "random forest"), ("svc", "SVC"),
                       ("hard_voting", "hard voting"), ("soft_voting", "soft voting")):
        compare(f"moons: {label}, test accuracy", key)
    note = "" if full else "smoke: fewer estimators"
    compare("bagging (500 trees): out-of-bag accuracy", "bagging_oob", note)
    compare("bagging: test accuracy", "bagging_test", note)
    compare("random forest (500, 16 leaves): test accuracy", "random_forest_500_leaf16", note)
    compare("extra-trees (500, 16 leaves): test accuracy", "extra_trees_500_leaf16", note)
    compare("AdaBoost (30 stumps, lr 0.5): test accuracy", "adaboost")
    compare("stacking (final: random forest), test accuracy", "stacking", note)
    compare("gradient boosting with early stopping: trees kept", "gbrt_early_stopping_trees",
            "quadratic data from default_rng(42)")
    if "housing_hgb_cv_rmse" in results:
        ours = round(results["housing_hgb_cv_rmse"])
        report.compare("housing: histogram boosting, 10-fold CV RMSE", ours, BOOK_HGB_CV_RMSE,
                       f"the book: about 47,600; {100 * (ours - BOOK_HGB_CV_RMSE) / BOOK_HGB_CV_RMSE:+.1f}%; raw "
                       "columns, no preprocessing beyond an ordinal encoder")
    report.table("Gradient boosting by hand vs the book and scikit-learn (3 trees, lr 1.0) at x = -0.4, 0, 0.5",
                 ["x", "by hand", "book", "scikit-learn"],
                 [[x, f"{a:.8f}", f"{book}", f"{b:.8f}"] for x, a, book, b in
                  zip((-0.4, 0.0, 0.5), results["gbrt_by_hand"], BOOK_GBRT_BY_HAND, results["gbrt_sklearn_3_trees"],
                      strict=True)])
    report.table("Iris feature importances (random forest)", ["feature", "importance"],
                 list(results["iris_feature_importances"].items()))
    report.text("The iris tree", f"```\n{tree_text}```")
    report.image("Decision boundaries on moons", run.plots / "moons_ensembles.png", run.path)
    report.write(run.path)


def boundaries_plot(path: Any, x: np.ndarray, y: np.ndarray, models: dict[str, Any]) -> None:
    from torchbook.plots import plt, save_figure

    models = {k: v for k, v in models.items() if v is not None}
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    grid_x, grid_y = np.meshgrid(np.linspace(-1.5, 2.5, 200), np.linspace(-1.0, 1.5, 200))
    grid = np.c_[grid_x.ravel(), grid_y.ravel()]
    for ax, (name, model) in zip(axes[0], models.items(), strict=True):
        ax.contourf(grid_x, grid_y, model.predict(grid).reshape(grid_x.shape), alpha=0.25, cmap="coolwarm")
        ax.scatter(x[:, 0], x[:, 1], c=y, s=8, cmap="coolwarm")
        ax.set_title(name)
    save_figure(fig, path)


RECIPE = Recipe(NAME, "5-6", "Iris decision tree, moons: voting, bagging/OOB, forests, boosting, stacking",
                Config, run)
