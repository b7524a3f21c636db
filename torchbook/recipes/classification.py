"""`classification`: chapter 3 on MNIST (offline: scikit-learn's digits, `data=digits`).

A binary "5-detector" (SGD) against a dummy baseline with 3-fold cross-validation, its confusion matrix,
precision, recall and F1, the precision/recall trade-off and the threshold for 90% precision, ROC and PR curves
beside a random forest; multiclass classification (SVC, one-versus-rest, scaled SGD) with confusion-matrix
plots; multilabel classification (KNN on "large" and "odd", a classifier chain) and multioutput classification
(a KNN that removes noise from images). MNIST: the first 60,000 images train, the last 10,000 test, as in the
book; digits: a stratified 80/20 split (seed 42).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from sklearn.base import clone
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.model_selection import StratifiedKFold, cross_val_predict, cross_val_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.multioutput import ClassifierChain
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from torchbook.data.sources import DIGITS_SOURCE, MNIST_SOURCE, load_digits_split, load_mnist
from torchbook.hub import save_estimator
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir

NAME = "classification"
# The book's figures, all on MNIST, as printed (the cross-validations print their three folds' accuracies).
BOOK = {
    "sgd_precision": 0.837, "sgd_recall": 0.651, "sgd_f1": 0.733, "sgd_roc_auc": 0.960, "forest_f1": 0.927,
    "forest_roc_auc": 0.998, "multilabel_knn_macro_f1": 0.976,
}
BOOK_FOLDS = {
    "sgd_cv_folds": [0.95035, 0.96035, 0.9604],
    "dummy_cv_folds": [0.90965, 0.90965, 0.90965],
    "multiclass_sgd_scaled_cv_folds": [0.8983, 0.891, 0.9018],
}


@dataclass
class Config:
    seed: int = 42
    data: Literal["mnist", "digits"] = "mnist"
    svc_limit: int = 2000  # the book trains its SVCs on the first 2,000 images
    multiclass_limit: int = 0  # the scaled-SGD cross-validation on this many images (0 = all)
    knn_limit: int = 0  # the multilabel and multioutput KNNs on this many images (0 = all)
    n_jobs: int = -1

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"data": "digits", "n_jobs": 1},
        "quick": {"data": "digits"},
        "book": {},
    }


@dataclass
class Digits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    side: int
    pixel_max: float
    source: str


def load(config: Config) -> Digits:
    if config.data == "mnist":
        return Digits(*load_mnist(), side=28, pixel_max=255.0, source=MNIST_SOURCE)
    return Digits(*load_digits_split(seed=config.seed), side=8, pixel_max=16.0, source=DIGITS_SOURCE)


def binary_detector(d: Digits, seed: int, n_jobs: int) -> dict[str, Any]:
    """The 5-detector: accuracy is misleading (a dummy gets 90%), precision and recall are not."""
    y5 = d.y_train == 5
    sgd = SGDClassifier(random_state=seed)
    sgd_folds = cross_val_score(sgd, d.x_train, y5, cv=3, scoring="accuracy", n_jobs=n_jobs)
    dummy_folds = cross_val_score(DummyClassifier(), d.x_train, y5, cv=3, scoring="accuracy")
    out: dict[str, Any] = {
        "sgd_cv_folds": sgd_folds.tolist(), "sgd_cv_accuracy": float(sgd_folds.mean()),
        "dummy_cv_folds": dummy_folds.tolist(), "dummy_cv_accuracy": float(dummy_folds.mean()),
    }
    predictions = cross_val_predict(sgd, d.x_train, y5, cv=3, n_jobs=n_jobs)
    out["sgd_confusion"] = confusion_matrix(y5, predictions).tolist()
    out["sgd_precision"] = float(precision_score(y5, predictions))
    out["sgd_recall"] = float(recall_score(y5, predictions))
    out["sgd_f1"] = float(f1_score(y5, predictions))
    scores = cross_val_predict(sgd, d.x_train, y5, cv=3, method="decision_function", n_jobs=n_jobs)
    precisions, recalls, thresholds = precision_recall_curve(y5, scores)
    threshold = float(thresholds[(precisions[:-1] >= 0.90).argmax()])
    at_threshold = scores >= threshold
    out.update({"threshold_90_precision": threshold,
                "precision_at_threshold": float(precision_score(y5, at_threshold)),
                "recall_at_threshold": float(recall_score(y5, at_threshold)),
                "sgd_roc_auc": float(roc_auc_score(y5, scores))})
    forest = RandomForestClassifier(random_state=seed, n_jobs=n_jobs)
    probabilities = cross_val_predict(forest, d.x_train, y5, cv=3, method="predict_proba")[:, 1]
    out["forest_f1"] = float(f1_score(y5, probabilities >= 0.5))
    out["forest_roc_auc"] = float(roc_auc_score(y5, probabilities))
    out["curves"] = {"y5": y5, "sgd_scores": scores, "forest_probabilities": probabilities,
                     "precisions": precisions, "recalls": recalls, "thresholds": thresholds, "threshold": threshold}
    return out


def multiclass(d: Digits, config: Config) -> dict[str, Any]:
    """SVC (one-versus-one inside), an explicit one-versus-rest SVC, and SGD with and without scaling."""
    n = config.svc_limit or len(d.x_train)
    svc = SVC(random_state=config.seed).fit(d.x_train[:n], d.y_train[:n])
    ovr = OneVsRestClassifier(SVC(random_state=config.seed)).fit(d.x_train[:n], d.y_train[:n])
    m = config.multiclass_limit or len(d.x_train)
    x, y = d.x_train[:m], d.y_train[:m]
    sgd = SGDClassifier(random_state=config.seed)
    scaled = make_pipeline(StandardScaler(), clone(sgd))
    predictions = cross_val_predict(scaled, x, y, cv=3, n_jobs=config.n_jobs)
    # cross_val_predict and cross_val_score cut the same 3 stratified folds: each fold's accuracy, as the book prints
    folds = [float((predictions[test] == y[test]).mean()) for _, test in StratifiedKFold(3).split(x, y)]
    return {
        "svc": svc, "svc_test_accuracy": float(svc.score(d.x_test, d.y_test)),
        "svc_decision_scores_first_test": svc.decision_function(d.x_test[:1]).round(2).tolist()[0],
        "ovr_estimators": len(ovr.estimators_), "ovr_test_accuracy": float(ovr.score(d.x_test, d.y_test)),
        "multiclass_sgd_cv_accuracy": float(cross_val_score(sgd, x, y, cv=3, n_jobs=config.n_jobs).mean()),
        "multiclass_sgd_scaled_cv_accuracy": float((predictions == y).mean()),
        "multiclass_sgd_scaled_cv_folds": folds,
        "multiclass_predictions": predictions, "multiclass_truth": y,
    }


def multilabel_multioutput(d: Digits, config: Config) -> dict[str, Any]:
    """KNN predicting two labels at once ("large", "odd"), a classifier chain, and a KNN that denoises images."""
    k = config.knn_limit or len(d.x_train)
    x, y = d.x_train[:k], d.y_train[:k]
    labels = np.c_[y >= 7, y % 2 == 1]
    knn = KNeighborsClassifier()
    predicted = cross_val_predict(knn, x, labels, cv=3, n_jobs=config.n_jobs)
    n = config.svc_limit or len(x)
    chain = ClassifierChain(SVC(), cv=3, random_state=config.seed).fit(x[:n], labels[:n])

    rng = np.random.default_rng(config.seed)
    noise_max = int(round(100 * d.pixel_max / 255)) + 1  # the book adds noise up to 100 of 255
    noisy_train = x + rng.integers(0, noise_max, x.shape)
    noisy_test = d.x_test + rng.integers(0, noise_max, d.x_test.shape)
    cleaner = KNeighborsClassifier().fit(noisy_train, x)
    cleaned = cleaner.predict(noisy_test[:200])
    return {
        "multilabel_knn_macro_f1": float(f1_score(labels, predicted, average="macro")),
        "multilabel_knn_weighted_f1": float(f1_score(labels, predicted, average="weighted")),
        "chain_test_subset_accuracy": float((chain.predict(d.x_test) == np.c_[d.y_test >= 7, d.y_test % 2 == 1])
                                            .all(axis=1).mean()),
        "denoise_noisy_rmse": float(np.sqrt(np.mean((noisy_test[:200] - d.x_test[:200]) ** 2))),
        "denoise_cleaned_rmse": float(np.sqrt(np.mean((cleaned - d.x_test[:200]) ** 2))),
        "denoise_example": (d.x_test[0], noisy_test[0], cleaned[0]),
    }


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    run = RunDir.start(run_dir, NAME, config)
    d = load(config)
    report = Report(f"Classification on {config.data.upper() if config.data == 'mnist' else config.data}", NAME, "3",
                    d.source)
    run.write_json("split.json", {
        "source": d.source, "seed": config.seed, "sizes": {"train": len(d.x_train), "test": len(d.x_test)},
        "split": "first 60,000 train, last 10,000 test" if config.data == "mnist" else
        "train_test_split(test_size=0.2, stratify=labels, random_state=seed)",
    })
    binary = binary_detector(d, config.seed, config.n_jobs)
    curves = binary.pop("curves")
    multi = multiclass(d, config)
    multi_out = multilabel_multioutput(d, config)
    results: dict[str, Any] = {"data": config.data, **binary}
    results.update({k: v for k, v in multi.items() if k not in ("svc", "multiclass_predictions", "multiclass_truth")})
    results.update({k: v for k, v in multi_out.items() if k != "denoise_example"})
    save_estimator(multi["svc"], run.model_dir, extra={"recipe": NAME, "data": config.data,
                                                       "inputs": f"{d.side}x{d.side} pixels, flat"})
    run.write_json("results.json", results)
    run.log(kind="eval", **{k: v for k, v in results.items() if isinstance(v, (int, float))})
    plot_curves(run, curves)
    plot_confusion(run, multi["multiclass_truth"], multi["multiclass_predictions"])
    plot_denoise(run, multi_out["denoise_example"], d.side)
    write_report(report, run, config, results)
    return run


def write_report(report: Report, run: RunDir, config: Config, results: dict[str, Any]) -> None:
    on_mnist = config.data == "mnist"
    for key, label in (("sgd_cv_folds", "5-detector (SGD): accuracy of the 3 CV folds"),
                       ("dummy_cv_folds", "dummy (never 5): accuracy of the 3 CV folds"),
                       ("multiclass_sgd_scaled_cv_folds", "multiclass SGD with scaling: accuracy of the 3 CV folds")):
        our_folds, book_folds = results[key], BOOK_FOLDS[key]
        note = (f"largest difference {max(abs(a - b) for a, b in zip(our_folds, book_folds, strict=True)):.4f}"
                if on_mnist else "ours on digits; the book's on MNIST")
        report.compare(label, ", ".join(f"{v:.5g}" for v in our_folds), ", ".join(f"{v:.5g}" for v in book_folds),
                       note)
    labels = {
        "sgd_precision": "5-detector: precision", "sgd_recall": "5-detector: recall", "sgd_f1": "5-detector: F1",
        "sgd_roc_auc": "5-detector: ROC AUC", "forest_f1": "random forest 5-detector: F1",
        "forest_roc_auc": "random forest: ROC AUC",
        "multilabel_knn_macro_f1": "multilabel KNN (large, odd): macro F1",
    }
    for key, label in labels.items():
        ours, book = results[key], BOOK[key]
        note = f"{ours - book:+.3f}" if on_mnist else "ours on digits; the book's on MNIST"
        report.compare(label, round(ours, 4), book, note)
    report.compare("threshold for 90% precision", round(results["threshold_90_precision"], 2), None,
                   f"precision {results['precision_at_threshold']:.3f}, recall {results['recall_at_threshold']:.3f}")
    report.compare("multiclass SGD without scaling: CV accuracy", round(results["multiclass_sgd_cv_accuracy"], 4), None)
    report.compare(f"SVC on the first {config.svc_limit:,} images: test accuracy",
                   round(results["svc_test_accuracy"], 4), None)
    report.compare("one-versus-rest SVC: test accuracy", round(results["ovr_test_accuracy"], 4), None,
                   f"{results['ovr_estimators']} binary classifiers")
    report.compare("classifier chain (SVC): test subset accuracy", round(results["chain_test_subset_accuracy"], 4), None)
    report.compare("denoising KNN: RMSE to the clean image, noisy -> cleaned",
                   f"{results['denoise_noisy_rmse']:.2f} -> {results['denoise_cleaned_rmse']:.2f}", None,
                   "200 test images")
    report.table("5-detector confusion matrix (cross-validated)", ["", "predicted not 5", "predicted 5"],
                 [["actual not 5", *results["sgd_confusion"][0]], ["actual 5", *results["sgd_confusion"][1]]])
    for name, heading in (("precision_recall", "Precision and recall against the threshold"),
                          ("pr_curves", "Precision/recall curves"), ("roc_curves", "ROC curves"),
                          ("confusion_matrix", "Multiclass confusion matrix (scaled SGD, cross-validated)"),
                          ("denoise", "Multioutput: cleaning a noisy image")):
        report.image(heading, run.plots / f"{name}.png", run.path)
    report.write(run.path)


def plot_curves(run: RunDir, c: dict[str, Any]) -> None:
    from torchbook.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(c["thresholds"], c["precisions"][:-1], "b--", label="precision")
    ax.plot(c["thresholds"], c["recalls"][:-1], "g-", label="recall")
    ax.axvline(c["threshold"], color="k", linestyle=":", label="90% precision")
    ax.set_xlabel("threshold")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, run.plots / "precision_recall.png")

    forest_p, forest_r, _ = precision_recall_curve(c["y5"], c["forest_probabilities"])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(c["recalls"], c["precisions"], "b--", label="SGD")
    ax.plot(forest_r, forest_p, "g-", label="random forest")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, run.plots / "pr_curves.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, scores, style in (("SGD", c["sgd_scores"], "b--"), ("random forest", c["forest_probabilities"], "g-")):
        fpr, tpr, _ = roc_curve(c["y5"], scores)
        ax.plot(fpr, tpr, style, label=f"{name} (AUC {roc_auc_score(c['y5'], scores):.3f})")
    ax.plot([0, 1], [0, 1], "k:")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (recall)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, run.plots / "roc_curves.png")


def plot_confusion(run: RunDir, truth: np.ndarray, predictions: np.ndarray) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    from torchbook.plots import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ConfusionMatrixDisplay.from_predictions(truth, predictions, normalize="true", values_format=".0%", ax=axes[0],
                                            colorbar=False)
    axes[0].set_title("normalized by row")
    errors = predictions != truth
    ConfusionMatrixDisplay.from_predictions(truth, predictions, sample_weight=errors, normalize="true",
                                            values_format=".0%", ax=axes[1], colorbar=False)
    axes[1].set_title("errors only, normalized by row")
    save_figure(fig, run.plots / "confusion_matrix.png")


def plot_denoise(run: RunDir, images: tuple[np.ndarray, ...], side: int) -> None:
    from torchbook.plots import plt, save_figure

    fig, axes = plt.subplots(1, 3, figsize=(6, 2.3))
    for ax, image, title in zip(axes, images, ("clean", "noisy", "cleaned by KNN"), strict=True):
        ax.imshow(np.asarray(image).reshape(side, side), cmap="binary")
        ax.set_title(title)
        ax.axis("off")
    save_figure(fig, run.plots / "denoise.png")


RECIPE = Recipe(NAME, "3", "MNIST 5-detector, precision/recall, ROC, multiclass, multilabel, multioutput (offline: digits)",
                Config, run)
