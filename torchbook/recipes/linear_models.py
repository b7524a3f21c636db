"""`linear-models`: chapter 4, training models, on the book's seeded data and on iris.

Linear regression four ways on the same 200 points (x = 2 * uniform, y = 4 + 3x + noise, NumPy default_rng(42)):
the normal equation, batch gradient descent, stochastic gradient descent with the learning schedule
t0 / (t + t1), and mini-batch gradient descent, all written out as the book writes them. Then polynomial
regression on a quadratic (x = 6 * uniform - 3), learning curves of a linear and a degree-10 model, the
regularized models (ridge, lasso, elastic net, on 20 noisy points), early stopping of a degree-90 polynomial
trained by SGD, and logistic and softmax regression on iris.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import ElasticNet, Lasso, LinearRegression, LogisticRegression, Ridge, SGDRegressor
from sklearn.metrics import root_mean_squared_error
from sklearn.model_selection import learning_curve, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from torchbook.hub import save_estimator
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir

NAME = "linear-models"
SOURCE = ("synthetic data drawn with NumPy default_rng(42) exactly as the book describes (chapter 4); "
          "iris (Fisher, 1936) bundled with scikit-learn")
BOOK = {
    "normal_theta": (3.69084138, 3.32960458), "batch_gd_theta": (3.69084138, 3.32960458),
    "sgd_theta": (3.698, 3.307),  # as BOOK_MAP.md quotes the book: "about (3.698, 3.307)"
    "poly_intercept": 2.00540719, "poly_coef": (1.11022126, 0.50526985),
    "iris_boundary": 1.65, "softmax_proba": (0.0, 0.04, 0.96),
}
# Chapter 4 prints each regularized model's prediction for x = 1.5 (the elastic net's with 7 decimals).
BOOK_REGULARIZED_AT_1_5 = {
    "ridge (alpha 0.1, closed form)": 1.84414523, "ridge by SGD (l2 penalty)": 1.83659707,
    "lasso (alpha 0.1)": 1.87550211, "elastic net (alpha 0.1, l1_ratio 0.5)": 1.8645014,
}


@dataclass
class Config:
    seed: int = 42
    m: int = 200  # points of the linear and quadratic data
    gd_lr: float = 0.1
    gd_epochs: int = 1000
    sgd_epochs: int = 50
    sgd_t0: float = 5.0
    sgd_t1: float = 50.0
    minibatch_size: int = 20
    minibatch_t0: float = 200.0
    minibatch_t1: float = 1000.0
    learning_curve_points: int = 40
    early_stopping_epochs: int = 500
    softmax_c: float = 30.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"learning_curve_points": 8, "early_stopping_epochs": 60},
        "quick": {},
        "book": {},
    }


# -- the book's data -----------------------------------------------------------------------------------------
def linear_data(m: int = 200, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """x = 2 * uniform draws, y = 4 + 3x + standard normal noise, both (m, 1), from a fresh default_rng(seed)."""
    rng = np.random.default_rng(seed)
    x = 2 * rng.random((m, 1))
    return x, 4 + 3 * x + rng.standard_normal((m, 1))


def quadratic_data(m: int = 200, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """x = 6 * uniform - 3, y = 0.5 x^2 + x + 2 + noise."""
    rng = np.random.default_rng(seed)
    x = 6 * rng.random((m, 1)) - 3
    return x, 0.5 * x**2 + x + 2 + rng.standard_normal((m, 1))


def regularization_data(m: int = 20, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The small noisy line of the regularization figures: y = 1 + 0.5x + noise / 1.5."""
    rng = np.random.default_rng(seed)
    x = 3 * rng.random((m, 1))
    return x, 1 + 0.5 * x + rng.standard_normal((m, 1)) / 1.5


def add_bias(x: np.ndarray) -> np.ndarray:
    """x0 = 1 in front of every instance (equation 4-2's bias term)."""
    return np.c_[np.ones((len(x), 1)), x]


# -- linear regression by hand -------------------------------------------------------------------------------
def normal_equation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Equation 4-4: theta = (X^T X)^-1 X^T y."""
    xb = add_bias(x)
    return np.linalg.inv(xb.T @ xb) @ xb.T @ y


def batch_gradient_descent(x: np.ndarray, y: np.ndarray, lr: float = 0.1, epochs: int = 1000,
                           seed: int = 42) -> tuple[np.ndarray, list[np.ndarray]]:
    """Equations 4-6 and 4-7: the MSE gradient over the whole training set at every step. Returns theta and its path."""
    xb, m = add_bias(x), len(x)
    theta = np.random.default_rng(seed).standard_normal((xb.shape[1], 1))
    path = [theta.copy()]
    for _ in range(epochs):
        gradients = 2 / m * xb.T @ (xb @ theta - y)
        theta = theta - lr * gradients
        path.append(theta.copy())
    return theta, path


def stochastic_gradient_descent(x: np.ndarray, y: np.ndarray, epochs: int = 50, t0: float = 5, t1: float = 50,
                                seed: int = 42) -> tuple[np.ndarray, list[np.ndarray]]:
    """One random instance per step (drawn with replacement), learning rate t0 / (t + t1)."""
    rng = np.random.default_rng(seed)
    xb, m = add_bias(x), len(x)
    theta = rng.standard_normal((xb.shape[1], 1))
    path = [theta.copy()]
    for epoch in range(epochs):
        for iteration in range(m):
            i = rng.integers(m)
            xi, yi = xb[i : i + 1], y[i : i + 1]
            gradients = 2 * xi.T @ (xi @ theta - yi)  # not divided by m: one instance
            theta = theta - t0 / (epoch * m + iteration + t1) * gradients
            path.append(theta.copy())
    return theta, path


def minibatch_gradient_descent(x: np.ndarray, y: np.ndarray, epochs: int = 50, batch_size: int = 20,
                               t0: float = 200, t1: float = 1000, seed: int = 42) -> tuple[np.ndarray, list[np.ndarray]]:
    """Shuffled mini-batches each epoch, learning rate t0 / (t + t1) with t the step count."""
    rng = np.random.default_rng(seed)
    xb, m = add_bias(x), len(x)
    theta = rng.standard_normal((xb.shape[1], 1))
    path, step = [theta.copy()], 0
    for _ in range(epochs):
        order = rng.permutation(m)
        for start in range(0, m, batch_size):
            batch = order[start : start + batch_size]
            gradients = 2 / len(batch) * xb[batch].T @ (xb[batch] @ theta - y[batch])
            step += 1
            theta = theta - t0 / (step + t1) * gradients
            path.append(theta.copy())
    return theta, path


def early_stopping_sgd(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                       epochs: int = 500, seed: int = 42) -> tuple[Any, int, list[float], list[float]]:
    """A degree-90 polynomial trained by SGD one epoch at a time; keep the model with the best validation RMSE."""
    preprocessing = make_pipeline(PolynomialFeatures(degree=90, include_bias=False), StandardScaler())
    xt, xv = preprocessing.fit_transform(x_train), preprocessing.transform(x_val)
    sgd = SGDRegressor(penalty=None, eta0=0.002, random_state=seed)
    best_rmse, best_epoch, best_model = float("inf"), -1, None
    train_curve, val_curve = [], []
    for epoch in range(epochs):
        sgd.partial_fit(xt, y_train.ravel())
        val_rmse = root_mean_squared_error(y_val, sgd.predict(xv))
        train_curve.append(root_mean_squared_error(y_train, sgd.predict(xt)))
        val_curve.append(val_rmse)
        if val_rmse < best_rmse:
            best_rmse, best_epoch, best_model = val_rmse, epoch, copy.deepcopy(sgd)
    return make_pipeline(preprocessing, best_model), best_epoch, train_curve, val_curve


# -- the recipe ----------------------------------------------------------------------------------------------
def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    from torchbook.plots import line_plot

    run = RunDir.start(run_dir, NAME, config)
    report = Report("Training models: linear, polynomial, regularized and logistic regression", NAME, "4", SOURCE)
    results: dict[str, Any] = {}
    x, y = linear_data(config.m, config.seed)
    results["normal_theta"] = normal_equation(x, y).ravel()
    results["lstsq_theta"] = np.r_[LinearRegression().fit(x, y).intercept_, LinearRegression().fit(x, y).coef_.ravel()]
    theta, batch_path = batch_gradient_descent(x, y, config.gd_lr, config.gd_epochs, config.seed)
    results["batch_gd_theta"] = theta.ravel()
    theta, sgd_path = stochastic_gradient_descent(x, y, config.sgd_epochs, config.sgd_t0, config.sgd_t1, config.seed)
    results["sgd_theta"] = theta.ravel()
    theta, mini_path = minibatch_gradient_descent(x, y, config.sgd_epochs, config.minibatch_size,
                                                  config.minibatch_t0, config.minibatch_t1, config.seed)
    results["minibatch_theta"] = theta.ravel()
    sk_sgd = SGDRegressor(max_iter=1000, tol=1e-5, penalty=None, eta0=0.01, n_iter_no_change=100,
                          random_state=config.seed).fit(x, y.ravel())
    results["sklearn_sgd_theta"] = np.r_[sk_sgd.intercept_, sk_sgd.coef_]
    gd_paths_plot(run.plots / "gradient_descent_paths.png",
                  {"stochastic": sgd_path, "mini-batch": mini_path, "batch": batch_path})

    xq, yq = quadratic_data(config.m, config.seed)
    poly = make_pipeline(PolynomialFeatures(degree=2, include_bias=False), LinearRegression()).fit(xq, yq)
    results["poly_intercept"] = float(poly[-1].intercept_[0])
    results["poly_coef"] = poly[-1].coef_.ravel()
    curves = {}
    for name, model in (("linear", LinearRegression()),
                        ("degree 10", make_pipeline(PolynomialFeatures(degree=10, include_bias=False),
                                                    LinearRegression()))):
        sizes, train_scores, val_scores = learning_curve(
            model, xq, yq, train_sizes=np.linspace(0.01, 1.0, config.learning_curve_points), cv=5,
            scoring="neg_root_mean_squared_error")
        curves[f"{name} train"] = (sizes, -train_scores.mean(axis=1))
        curves[f"{name} validation"] = (sizes, -val_scores.mean(axis=1))
        results[f"learning_curve_{name.replace(' ', '')}_final_val_rmse"] = float(-val_scores.mean(axis=1)[-1])
    line_plot(run.plots / "learning_curves.png", curves, "Learning curves (quadratic data)", "training set size",
              "RMSE")

    regularized_rows = regularized_models(config.seed)
    results["regularized_predictions_at_1.5"] = {row[0]: row[1] for row in regularized_rows}

    xe, ye = quadratic_data(100, config.seed)  # the book's early-stopping set: 100 points, halves train / validate
    _, best_epoch, train_curve, val_curve = early_stopping_sgd(xe[:50], ye[:50], xe[50:], ye[50:],
                                                               config.early_stopping_epochs, config.seed)
    results["early_stopping_best_epoch"] = best_epoch
    results["early_stopping_best_val_rmse"] = float(min(val_curve))
    epochs = range(len(val_curve))
    line_plot(run.plots / "early_stopping.png", {"train": (epochs, train_curve), "validation": (epochs, val_curve)},
              "Early stopping: degree-90 polynomial trained by SGD", "epoch", "RMSE", logy=True)

    iris = iris_models(config)
    results.update(iris.pop("results"))
    save_estimator(iris["softmax"], run.model_dir, extra={"recipe": NAME, "inputs": ["petal length", "petal width"],
                                                          "classes": ["setosa", "versicolor", "virginica"]})
    boundary_plot(run.plots / "iris_logistic.png", iris["logistic"], results["iris_boundary"])
    run.write_json("split.json", {"source": SOURCE, "seed": config.seed,
                                  "linear and quadratic data": f"{config.m} points, all for training",
                                  "early stopping": "100 quadratic points: first 50 train, last 50 validate",
                                  "iris": "train_test_split(seed), 112 train / 38 test"})
    results = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in results.items()}
    run.write_json("results.json", results)
    run.log(kind="eval", **{k: v for k, v in results.items() if isinstance(v, (int, float))})
    write_report(report, run, results, regularized_rows)
    return run


def regularized_models(seed: int = 42) -> list[list[Any]]:
    """Ridge (closed form and SGD), lasso and elastic net on the 20 noisy points, as chapter 4 fits them: rows of
    (model, prediction at x = 1.5, slope, the book's printed prediction or None)."""
    xr, yr = regularization_data(20, seed)
    regularized = {
        "ridge (alpha 0.1, closed form)": Ridge(alpha=0.1, solver="cholesky"),
        "ridge by SGD (l2 penalty)": SGDRegressor(penalty="l2", alpha=0.1 / 20, tol=None, max_iter=1000, eta0=0.01,
                                                  random_state=seed),
        "lasso (alpha 0.1)": Lasso(alpha=0.1),
        "elastic net (alpha 0.1, l1_ratio 0.5)": ElasticNet(alpha=0.1, l1_ratio=0.5),
        "plain linear regression": LinearRegression(),
    }
    rows = []
    for name, model in regularized.items():
        model.fit(xr, yr.ravel())
        rows.append([name, float(model.predict([[1.5]])[0]), float(np.ravel(model.coef_)[0]),
                     BOOK_REGULARIZED_AT_1_5.get(name)])
    return rows


def iris_models(config: Config) -> dict[str, Any]:
    """Logistic regression on petal width (virginica or not) and softmax regression on the two petal features."""
    iris = load_iris(as_frame=True)
    x_width = iris.data[["petal width (cm)"]].to_numpy()
    is_virginica = iris.target_names[iris.target] == "virginica"
    x_train, _, y_train, _ = train_test_split(x_width, is_virginica, random_state=config.seed)
    logistic = LogisticRegression(random_state=config.seed).fit(x_train, y_train)
    x_new = np.linspace(0, 3, 1000).reshape(-1, 1)
    boundary = float(x_new[logistic.predict_proba(x_new)[:, 1] >= 0.5][0, 0])

    x_petals = iris.data[["petal length (cm)", "petal width (cm)"]].to_numpy()
    x_train, x_test, y_train, y_test = train_test_split(x_petals, iris.target.to_numpy(), random_state=config.seed)
    softmax = LogisticRegression(C=config.softmax_c, random_state=config.seed).fit(x_train, y_train)
    return {"logistic": logistic, "softmax": softmax, "results": {
        "iris_boundary": boundary,
        "softmax_proba": softmax.predict_proba([[5, 2]])[0], "softmax_prediction": int(softmax.predict([[5, 2]])[0]),
        "softmax_test_accuracy": float(softmax.score(x_test, y_test)),
    }}


def write_report(report: Report, run: RunDir, results: dict[str, Any], regularized_rows: list[list[Any]]) -> None:
    def pair(values: Any, digits: int = 3) -> str:
        return "(" + ", ".join(f"{float(v):.{digits}f}" for v in values) + ")"

    for key, label in (("normal_theta", "normal equation theta"), ("batch_gd_theta", "batch GD theta (lr 0.1)"),
                       ("sgd_theta", "SGD theta (t0 5, t1 50, 50 epochs)")):
        report.compare(label, pair(results[key], 8), pair(BOOK[key], 8))
    report.compare("mini-batch GD theta (batch 20)", pair(results["minibatch_theta"], 4), None, "the book prints none")
    report.compare("scikit-learn SGDRegressor theta", pair(results["sklearn_sgd_theta"], 4), None)
    report.compare("polynomial (degree 2) intercept", round(results["poly_intercept"], 8), BOOK["poly_intercept"])
    report.compare("polynomial coefficients", pair(results["poly_coef"], 8), pair(BOOK["poly_coef"], 8))
    report.compare("iris logistic decision boundary (petal width, cm)", round(results["iris_boundary"], 3),
                   BOOK["iris_boundary"])
    report.compare("softmax (C=30) probabilities for petal (5, 2)", pair(results["softmax_proba"], 2),
                   pair(BOOK["softmax_proba"], 2))
    report.compare("softmax test accuracy (38 flowers)", results["softmax_test_accuracy"], None)
    report.compare("early stopping: best epoch", results["early_stopping_best_epoch"], None,
                   f"validation RMSE {results['early_stopping_best_val_rmse']:.4f}")
    report.table("Regularized models on 20 noisy points: prediction at x = 1.5 and slope",
                 ["model", "prediction", "book's prediction", "slope"],
                 [[name, f"{ours:.8f}", "-" if book is None else f"{book}", slope]
                  for name, ours, slope, book in regularized_rows])
    for name, heading in (("gradient_descent_paths", "Gradient descent paths in parameter space"),
                          ("learning_curves", "Learning curves"), ("early_stopping", "Early stopping"),
                          ("iris_logistic", "Iris: estimated probability of virginica")):
        report.image(heading, run.plots / f"{name}.png", run.path)
    report.write(run.path)


def gd_paths_plot(path: Any, paths: dict[str, list[np.ndarray]]) -> None:
    from torchbook.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (name, thetas), style in zip(paths.items(), ("r-s", "g-+", "b-o"), strict=True):
        points = np.array([t.ravel() for t in thetas])
        ax.plot(points[:, 0], points[:, 1], style, linewidth=1, markersize=3, label=name, alpha=0.7)
    ax.set_xlabel(r"$\theta_0$")
    ax.set_ylabel(r"$\theta_1$")
    ax.set_xlim(2.6, 4.2)
    ax.set_ylim(2.6, 4.0)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def boundary_plot(path: Any, model: Any, boundary: float) -> None:
    from torchbook.plots import plt, save_figure

    x_new = np.linspace(0, 3, 1000).reshape(-1, 1)
    proba = model.predict_proba(x_new)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(x_new, proba[:, 1], "g-", label="virginica")
    ax.plot(x_new, proba[:, 0], "b--", label="not virginica")
    ax.axvline(boundary, color="k", linestyle=":", label=f"decision boundary {boundary:.2f} cm")
    ax.set_xlabel("petal width (cm)")
    ax.set_ylabel("probability")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


RECIPE = Recipe(NAME, "4", "Normal equation and gradient descent by hand, polynomial, regularized, logistic/softmax",
                Config, run)
