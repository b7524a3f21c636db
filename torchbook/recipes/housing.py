"""`housing`: the end-to-end project of chapter 2, median house values of California districts.

Data: the book's housing archive (20,640 districts, 10 columns). The test set is 20% of the districts, split
stratified on an income category (median income cut at 1.5, 3, 4.5 and 6; seed 42), so 16,512 train and 4,128
test districts. One preprocessing pipeline turns the nine input columns into 24 features: three ratio features,
log transforms of five heavy-tailed counts, the similarity of each district to 10 k-means cluster centres of its
coordinates (RBF, gamma 1), one-hot ocean proximity and the scaled median age. Then the model ladder (linear
regression, decision tree, random forest, each with 10-fold cross-validation), a grid search (45 fits) and a
randomized search over the clusters and the forest's max_features; the best model is measured once on the test
set, with a bootstrap 95% confidence interval. The saved pipeline predicts from a CSV (`torchbook predict`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import KMeans
from sklearn.compose import ColumnTransformer, make_column_selector
from sklearn.ensemble import RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression
from sklearn.metrics import root_mean_squared_error
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.model_selection import GridSearchCV, RandomizedSearchCV, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from sklearn.tree import DecisionTreeRegressor

from torchbook.data.housing import (
    CATEGORICAL_INPUTS,
    INCOME_BINS,
    INPUTS,
    NUMERIC_INPUTS,
    OCEAN_PROXIMITY,
    TARGET,
    Split,
    income_category,
    stratified_split,
)
from torchbook.data.sources import HOUSING_SOURCE, load_housing
from torchbook.errors import UserInputError
from torchbook.hub import load_estimator, save_estimator
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir

NAME = "housing"
# The book's figures (chapter 2), dollars.
BOOK = {
    "linear_train_rmse": 68_973, "linear_cv_rmse": 70_003, "linear_cv_std": 4_182, "tree_cv_rmse": 66_574,
    "forest_cv_rmse": 47_038, "grid_best_cv_rmse": 43_590, "test_rmse": 41_446, "test_ci_low": 39_521,
    "test_ci_high": 43_702,
}
# The grid of the book's grid search: 15 combinations x 3 folds = 45 fits.
PARAM_GRID = [
    {"preprocessing__geo__n_clusters": [5, 8, 10], "random_forest__max_features": [4, 6, 8]},
    {"preprocessing__geo__n_clusters": [10, 15], "random_forest__max_features": [6, 8, 10]},
]


@dataclass
class Config:
    seed: int = 42
    test_size: float = 0.2
    n_clusters: int = 10  # k-means clusters of the coordinates, each an RBF similarity feature
    gamma: float = 1.0
    cv_folds: int = 10  # the model ladder's cross-validation
    trees: int = 100  # every random forest's n_estimators
    ladder: bool = True  # cross-validate linear regression, a decision tree and a random forest
    grid_search: bool = True
    random_search_iter: int = 10  # 0: no search, fit the final forest with final_n_clusters / final_max_features
    search_cv: int = 3
    final_n_clusters: int = 45  # what the book preset's randomized search picks here (the book prints no pick)
    final_max_features: int = 9
    bootstrap_resamples: int = 9999
    limit: int = 0  # use only this many training districts (0 = all), for smoke runs
    n_jobs: int = -1

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"limit": 2000, "cv_folds": 3, "trees": 10, "grid_search": False, "random_search_iter": 2,
                  "search_cv": 2, "bootstrap_resamples": 999, "n_jobs": 1},
        "quick": {"grid_search": False, "random_search_iter": 0},
        "book": {},
    }

    def validate(self) -> None:
        if not 0 < self.test_size < 1:
            raise UserInputError(f"test_size={self.test_size} must be between 0 and 1 (the book: 0.2)")
        if self.cv_folds < 2 or self.search_cv < 2:
            raise UserInputError("cv_folds and search_cv must be at least 2")


# -- the preprocessing pipeline -------------------------------------------------------------------------------
class ClusterSimilarity(BaseEstimator, TransformerMixin):  # type: ignore[misc]
    """Similarity (RBF kernel) of each point to the centres of `n_clusters` k-means clusters (chapter 2)."""

    def __init__(self, n_clusters: int = 10, gamma: float = 1.0, random_state: int | None = None):
        self.n_clusters = n_clusters
        self.gamma = gamma
        self.random_state = random_state

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> ClusterSimilarity:
        self.kmeans_ = KMeans(self.n_clusters, n_init=10, random_state=self.random_state)
        self.kmeans_.fit(X, sample_weight=sample_weight)
        return self

    def transform(self, X: Any) -> np.ndarray:
        return rbf_kernel(X, self.kmeans_.cluster_centers_, gamma=self.gamma)

    def get_feature_names_out(self, names: Any = None) -> list[str]:
        return [f"Cluster {i} similarity" for i in range(self.n_clusters)]


def column_ratio(X: Any) -> Any:
    return X[:, [0]] / X[:, [1]]


def ratio_name(function_transformer: Any, feature_names_in: Any) -> list[str]:
    return ["ratio"]


def ratio_pipeline() -> Pipeline:
    return make_pipeline(SimpleImputer(strategy="median"),
                         FunctionTransformer(column_ratio, feature_names_out=ratio_name), StandardScaler())


def preprocessing(n_clusters: int = 10, gamma: float = 1.0, seed: int = 42) -> ColumnTransformer:
    """Nine input columns in, 24 features out (with 10 clusters), as in the book."""
    log_pipeline = make_pipeline(SimpleImputer(strategy="median"),
                                 FunctionTransformer(np.log, feature_names_out="one-to-one"), StandardScaler())
    categorical = make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore"))
    default_numeric = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
    return ColumnTransformer([
        ("bedrooms", ratio_pipeline(), ["total_bedrooms", "total_rooms"]),
        ("rooms_per_house", ratio_pipeline(), ["total_rooms", "households"]),
        ("people_per_house", ratio_pipeline(), ["population", "households"]),
        ("log", log_pipeline, ["total_bedrooms", "total_rooms", "population", "households", "median_income"]),
        ("geo", ClusterSimilarity(n_clusters, gamma, random_state=seed), ["latitude", "longitude"]),
        ("cat", categorical, make_column_selector(dtype_include=object)),
    ], remainder=default_numeric)


# -- data ---------------------------------------------------------------------------------------------------
def income_proportions(split: Split, frame: pd.DataFrame) -> list[list[Any]]:
    rows = []
    for name, part in (("overall", frame), ("stratified test", split.test)):
        shares = income_category(part).value_counts(normalize=True).sort_index()
        rows.append([name, *(round(float(s), 4) for s in shares)])
    return rows


# -- input validation for predictions ------------------------------------------------------------------------
def check_districts(frame: pd.DataFrame, source: str = "the input") -> pd.DataFrame:
    """The nine input columns, numbers as floats; a UserInputError naming every missing or mistyped column."""
    missing = [c for c in INPUTS if c not in frame.columns]
    if missing:
        raise UserInputError(f"{source} lacks the column(s) {', '.join(missing)}; "
                             f"a districts file needs: {', '.join(INPUTS)}")
    frame = frame[INPUTS].copy()
    mistyped = []
    for column in NUMERIC_INPUTS:
        converted = pd.to_numeric(frame[column], errors="coerce")
        if (converted.isna() & frame[column].notna()).any():
            bad = frame[column][converted.isna() & frame[column].notna()].iloc[0]
            mistyped.append(f"{column} (not a number: {bad!r})")
        frame[column] = converted.astype(float)
    for column in CATEGORICAL_INPUTS:
        values = frame[column].dropna()
        if not values.map(lambda v: isinstance(v, str)).all():
            mistyped.append(f"{column} (expected text such as 'INLAND')")
        else:
            unknown_values = sorted(set(values) - set(OCEAN_PROXIMITY))
            if unknown_values:
                mistyped.append(f"{column} (unknown value(s) {', '.join(map(repr, unknown_values))}; accepted: "
                                f"{', '.join(OCEAN_PROXIMITY)})")
        frame[column] = frame[column].astype(object)
    if mistyped:
        raise UserInputError(f"{source} has mistyped column(s): {'; '.join(mistyped)}")
    if frame.empty:
        raise UserInputError(f"{source} has a header but no rows; give at least one district")
    return frame


def predict_csv(run_dir: RunDir | str | Path, csv_path: str | Path) -> pd.DataFrame:
    """Predicted median house values for the districts of a CSV file, by the run's saved pipeline."""
    run = RunDir.open(run_dir)
    path = Path(csv_path)
    if not path.is_file():
        raise UserInputError(f"{str(path)!r} does not exist; give a CSV file with the columns {', '.join(INPUTS)}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserInputError(f"{str(path)!r} is not a readable CSV file ({e})") from None
    districts = check_districts(frame, repr(str(path)))
    model = load_estimator(run.model_dir)
    out = frame.copy()
    out["predicted_median_house_value"] = model.predict(districts)
    return out


# -- the recipe ----------------------------------------------------------------------------------------------
def forest_pipeline(config: Config, n_clusters: int, max_features: int | float | None = 1.0) -> Pipeline:
    return Pipeline([
        ("preprocessing", preprocessing(n_clusters, config.gamma, config.seed)),
        ("random_forest", RandomForestRegressor(n_estimators=config.trees, max_features=max_features,
                                                random_state=config.seed, n_jobs=config.n_jobs)),
    ])


def cv_rmse(model: Any, x: pd.DataFrame, y: pd.Series, folds: int, n_jobs: int) -> np.ndarray:
    return -cross_val_score(model, x, y, scoring="neg_root_mean_squared_error", cv=folds, n_jobs=n_jobs)


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% confidence interval of the test RMSE by bootstrapping the squared errors (scipy's BCa)."""
    from scipy import stats

    squared_errors = (np.asarray(y_pred) - np.asarray(y_true)) ** 2
    result = stats.bootstrap([squared_errors], lambda e: np.sqrt(np.mean(e)), confidence_level=0.95,
                             n_resamples=resamples, random_state=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    report = Report("California housing: the end-to-end project", NAME, "2", HOUSING_SOURCE)
    frame = load_housing()
    split = stratified_split(frame, config.test_size, config.seed)
    if config.limit:
        split.train = split.train.iloc[: config.limit]
    run.write_json("split.json", {
        "source": HOUSING_SOURCE, "seed": config.seed, "stratified_on": "income category " + str(INCOME_BINS),
        "sizes": {"train": len(split.train), "test": len(split.test)},
        "indices": {"train": split.train.index.tolist(), "test": split.test.index.tolist()},
    })
    exploration_plots(run, split.train)
    x_train, y_train = split.xy("train")
    x_test, y_test = split.xy("test")
    results: dict[str, Any] = {"train_size": len(x_train), "test_size": len(x_test)}

    prep = preprocessing(config.n_clusters, config.gamma, config.seed).fit(x_train)
    results["n_features"] = len(prep.get_feature_names_out())
    ladder_rows = []
    if config.ladder:
        linear = make_pipeline(preprocessing(config.n_clusters, config.gamma, config.seed), LinearRegression())
        linear.fit(x_train, y_train)
        results["linear_train_rmse"] = root_mean_squared_error(y_train, linear.predict(x_train))
        models = {
            "linear": linear,
            "tree": make_pipeline(preprocessing(config.n_clusters, config.gamma, config.seed),
                                  DecisionTreeRegressor(random_state=config.seed)),
            "forest": forest_pipeline(config, config.n_clusters),
        }
        for name, model in models.items():
            started = time.time()
            # the forest parallelizes its trees; the cheap models parallelize over folds
            scores = cv_rmse(model, x_train, y_train, config.cv_folds, 1 if name == "forest" else config.n_jobs)
            results[f"{name}_cv_rmse"], results[f"{name}_cv_std"] = float(scores.mean()), float(scores.std())
            run.log(kind="cv", model=name, folds=config.cv_folds, rmse_mean=scores.mean(), rmse_std=scores.std(),
                    seconds=time.time() - started)
            ladder_rows.append([name, round(float(scores.mean())), round(float(scores.std())), config.cv_folds])

    search_rows: list[list[Any]] = []
    if config.grid_search:
        grid = GridSearchCV(forest_pipeline(config, config.n_clusters), PARAM_GRID, cv=config.search_cv,
                            scoring="neg_root_mean_squared_error")
        grid.fit(x_train, y_train)
        results["grid_best_cv_rmse"] = float(-grid.best_score_)
        results["grid_best_params"] = grid.best_params_
        results["grid_fits"] = len(grid.cv_results_["params"]) * config.search_cv
        search_rows += search_table("grid", grid)
    if config.random_search_iter:
        from scipy.stats import randint

        distributions = {"preprocessing__geo__n_clusters": randint(low=3, high=50),
                         "random_forest__max_features": randint(low=2, high=20)}
        search = RandomizedSearchCV(forest_pipeline(config, config.n_clusters), distributions,
                                    n_iter=config.random_search_iter, cv=config.search_cv,
                                    scoring="neg_root_mean_squared_error", random_state=config.seed)
        search.fit(x_train, y_train)
        results["random_best_cv_rmse"] = float(-search.best_score_)
        results["random_best_params"] = search.best_params_
        search_rows += search_table("randomized", search)
        final = search.best_estimator_
    else:
        final = forest_pipeline(config, config.final_n_clusters, config.final_max_features).fit(x_train, y_train)
    for row in search_rows:
        run.log(kind="search", search=row[0], n_clusters=row[1], max_features=row[2], cv_rmse=row[3])

    predictions = final.predict(x_test)
    results["test_rmse"] = root_mean_squared_error(y_test, predictions)
    results["test_ci_low"], results["test_ci_high"] = bootstrap_ci(y_test.to_numpy(), predictions,
                                                                   config.bootstrap_resamples, config.seed)
    importances = sorted(zip(final["preprocessing"].get_feature_names_out(),
                             final["random_forest"].feature_importances_, strict=True), key=lambda p: -p[1])
    results["feature_importances"] = {name: float(value) for name, value in importances}
    results["top_feature"] = importances[0][0]
    results["final_params"] = {"n_clusters": final["preprocessing"].named_transformers_["geo"].n_clusters,
                               "max_features": final["random_forest"].max_features}
    save_estimator(final, run.model_dir, extra={"recipe": NAME, "inputs": INPUTS, "target": TARGET})
    run.write_json("results.json", results)
    run.log(kind="eval", **{k: v for k, v in results.items() if isinstance(v, (int, float))})

    importance_plot(run.plots / "feature_importances.png", importances[:15])
    write_report(report, run, config, results, ladder_rows, search_rows, income_proportions(split, frame))
    return run


def search_table(kind: str, search: Any) -> list[list[Any]]:
    cv = search.cv_results_
    rows = [[kind, p["preprocessing__geo__n_clusters"], p["random_forest__max_features"], round(-float(s))]
            for p, s in zip(cv["params"], cv["mean_test_score"], strict=True)]
    return sorted(rows, key=lambda r: r[3])


def write_report(report: Report, run: RunDir, config: Config, results: dict[str, Any], ladder_rows: list[list[Any]],
                 search_rows: list[list[Any]], proportions: list[list[Any]]) -> None:
    full = not config.limit
    note = "" if full else f"on {config.limit:,} training districts only"

    def compare(metric: str, key: str, extra: str = "") -> None:
        if key in results:
            ours, book = results[key], BOOK.get(key)
            diff = f"{100 * (ours - book) / book:+.1f}% from the book" if book and full else note
            report.compare(metric, ours, book, "; ".join(x for x in (diff, extra) if x))

    compare("linear regression, training RMSE", "linear_train_rmse")
    compare(f"linear regression, {config.cv_folds}-fold CV RMSE", "linear_cv_rmse")
    compare(f"decision tree, {config.cv_folds}-fold CV RMSE", "tree_cv_rmse")
    compare(f"random forest, {config.cv_folds}-fold CV RMSE", "forest_cv_rmse", f"{config.trees} trees")
    compare(f"grid search best CV RMSE ({results.get('grid_fits', 0)} fits)", "grid_best_cv_rmse")
    compare("randomized search best CV RMSE", "random_best_cv_rmse")
    how = "best of the randomized search" if config.random_search_iter else \
        f"no search: n_clusters={config.final_n_clusters}, max_features={config.final_max_features}, what the book " \
        "preset's randomized search picks here (the book does not print its pick)"
    compare("final model, test RMSE", "test_rmse", how)
    compare("test RMSE 95% CI, low (bootstrap)", "test_ci_low")
    compare("test RMSE 95% CI, high (bootstrap)", "test_ci_high")
    report.compare("features after preprocessing", results["n_features"], 24 if config.n_clusters == 10 else None)
    report.compare("top feature", results["top_feature"], "log__median_income")
    model_file = run.model_dir / "model.joblib"
    if model_file.exists():  # a forest stores every node of every tree, and prediction needs them all
        report.compare("saved model size (MB)", model_file.stat().st_size / 1e6, None,
                       f"the whole pipeline with its {config.trees}-tree random forest, zlib-compressed")
    if full:
        inside = BOOK["test_ci_low"] <= results["test_rmse"] <= BOOK["test_ci_high"]
        within = abs(results["test_rmse"] - BOOK["test_rmse"]) / BOOK["test_rmse"]
        report.text("Verdict", f"Final test RMSE {results['test_rmse']:,.0f}: {100 * within:.1f}% from the book's "
                               f"41,446, {'inside' if inside else 'OUTSIDE'} the book's 95% CI (39,521 to 43,702).")
    report.table("Split: income-category proportions", ["set", "1", "2", "3", "4", "5"], proportions)
    if ladder_rows:
        report.table("Model ladder (cross-validation RMSE, $)", ["model", "mean", "std", "folds"], ladder_rows)
    if search_rows:
        report.table("Hyperparameter searches (CV RMSE, $)", ["search", "n_clusters", "max_features", "CV RMSE"],
                     search_rows)
    report.table("Feature importances (top 10)", ["feature", "importance"],
                 list(results["feature_importances"].items())[:10])
    for name, heading in (("map", "Prices on the map"), ("correlations", "Correlations with the median value"),
                          ("scatter_matrix", "Scatter matrix of the most promising attributes"),
                          ("histograms", "Histograms of the numeric attributes"),
                          ("feature_importances", "Feature importances of the final model")):
        report.image(heading, run.plots / f"{name}.png", run.path)
    report.text("Predict", f"`torchbook predict {run.path} districts.csv` reads a CSV with the columns "
                           f"{', '.join(INPUTS)} and adds `predicted_median_house_value`.")
    report.write(run.path)


def exploration_plots(run: RunDir, train: pd.DataFrame) -> None:
    from pandas.plotting import scatter_matrix

    from torchbook.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 5.5))
    points = ax.scatter(train["longitude"], train["latitude"], s=train["population"] / 100, c=train[TARGET],
                        cmap="jet", alpha=0.4)
    fig.colorbar(points, label="median house value ($)")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title("Training districts (size: population)")
    save_figure(fig, run.plots / "map.png")

    correlations = train[NUMERIC_INPUTS + [TARGET]].corr()[TARGET].drop(TARGET).sort_values()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.barh(correlations.index, correlations.to_numpy())
    ax.set_xlabel(f"Pearson correlation with {TARGET}")
    ax.grid(alpha=0.3)
    save_figure(fig, run.plots / "correlations.png")

    attributes = [TARGET, "median_income", "total_rooms", "housing_median_age"]
    axes = scatter_matrix(train[attributes], figsize=(10, 8), alpha=0.2, s=3)
    for ax in axes.ravel():  # large values in thousands, few ticks: the labels no longer collide
        ax.xaxis.set_major_locator(plt.MaxNLocator(3))
        ax.yaxis.set_major_locator(plt.MaxNLocator(3))
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_rotation(20)
        ax.yaxis.label.set_rotation(70)
        ax.yaxis.label.set_ha("right")
    save_figure(axes[0, 0].get_figure(), run.plots / "scatter_matrix.png")

    axes = train[NUMERIC_INPUTS + [TARGET]].hist(bins=50, figsize=(11, 8))
    save_figure(axes.ravel()[0].get_figure(), run.plots / "histograms.png")


def importance_plot(path: Path, importances: list[tuple[str, float]]) -> None:
    from torchbook.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    names = [name for name, _ in importances][::-1]
    ax.barh(names, [value for _, value in importances][::-1])
    ax.set_xlabel("importance (mean decrease in impurity)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def evaluate(run_dir: RunDir | str, device: str = "auto") -> dict[str, float]:
    """Reload the saved pipeline and measure its test RMSE again on the run's split (scikit-learn runs on the CPU
    whatever `device` says)."""
    run = RunDir.open(run_dir)
    config = run.load_config(Config)
    split = stratified_split(load_housing(), config.test_size, config.seed)
    x_test, y_test = split.xy("test")
    return {"test_rmse": root_mean_squared_error(y_test, load_estimator(run.model_dir).predict(x_test)),
            "test_size": len(x_test)}


RECIPE = Recipe(NAME, "2", "California housing end to end: split, pipeline, model ladder, searches, test RMSE with CI",
                Config, run, evaluate, predict=predict_csv)
