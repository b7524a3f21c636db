"""`unsupervised`: chapters 7 and 8, dimensionality reduction and unsupervised learning.

PCA on MNIST (offline: scikit-learn's digits, `data=digits`): explained variance, the number of dimensions that
keeps 95% of it, compression and reconstruction. Random projection and the Johnson-Lindenstrauss bound, LLE on
a swiss roll. K-means on the book's five blobs with the inertia elbow and the silhouette analysis; image
segmentation by colour clustering (scikit-learn's bundled flower photo: the book's ladybug photo is not
downloadable here); semi-supervised learning on digits (50 labels: random, representative, propagated);
DBSCAN on moons; Gaussian mixtures with BIC/AIC, anomaly detection and a Bayesian mixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from sklearn.cluster import DBSCAN, KMeans
from sklearn.datasets import load_digits, make_blobs, make_moons, make_swiss_roll
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import LocallyLinearEmbedding
from sklearn.metrics import silhouette_samples, silhouette_score
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture
from sklearn.neighbors import KNeighborsClassifier
from sklearn.random_projection import GaussianRandomProjection

from torchbook.data.sources import DIGITS_SOURCE, MNIST_SOURCE, load_digits_split, load_mnist
from torchbook.hub import save_estimator
from torchbook.recipes import Recipe
from torchbook.report import Report
from torchbook.runs import RunDir

NAME = "unsupervised"
BOOK = {
    "pca_components_95": 154, "jl_min_dim_5000_0.1": 7300, "semi_random_50": 0.758,
    "semi_representative_50": 0.834, "semi_full_propagation": 0.869, "semi_partial_propagation": 0.884,
    "semi_all_labels": 0.909,  # "about 90.9%" with all 1,400 labels
    "dbscan_eps0.05_clusters": 7,  # the book's first try on moons (eps 0.05) finds seven clusters
}
# The book's blobs: five centres with their own spread.
BLOB_CENTERS = np.array([[0.2, 2.3], [-1.5, 2.3], [-2.8, 1.8], [-2.8, 2.8], [-2.8, 1.3]])
BLOB_STD = np.array([0.4, 0.3, 0.1, 0.1, 0.1])


@dataclass
class Config:
    seed: int = 42
    data: Literal["mnist", "digits"] = "mnist"  # for PCA; offline: digits
    pca_limit: int = 0  # PCA on only this many training images (0 = all)
    rp_samples: int = 500  # random projection demo on random data
    rp_features: int = 10_000
    rp_eps: float = 0.3
    lle_samples: int = 1000
    kmeans_max_k: int = 8
    segmentation_colors: list[int] | None = None  # default: 10, 8, 6, 4, 2
    segmentation_downsample: int = 1  # keep every n-th pixel row and column
    labeled: int = 50  # semi-supervised: labels we pay for, also the number of clusters
    percentile_closest: float = 50.0  # partial propagation keeps this share of each cluster, closest first
    gmm_max_k: int = 10
    gmm_n_init: int = 10
    anomaly_percentile: float = 2.0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {"data": "digits", "rp_features": 2000, "lle_samples": 400, "kmeans_max_k": 5,
                  "segmentation_colors": [6, 2], "segmentation_downsample": 4, "gmm_max_k": 4, "gmm_n_init": 2},
        "quick": {"data": "digits"},
        "book": {},
    }


def blobs(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    return make_blobs(n_samples=2000, centers=BLOB_CENTERS, cluster_std=BLOB_STD, random_state=seed)


def mixture_data(seed: int = 42) -> np.ndarray:
    """Two stretched blobs and a round one (the book's Gaussian-mixture data)."""
    x1, _ = make_blobs(n_samples=1000, centers=((4, -4), (0, 0)), random_state=seed)
    x1 = x1 @ np.array([[0.374, 0.95], [0.732, 0.598]])
    x2, _ = make_blobs(n_samples=250, centers=1, random_state=seed)
    return np.r_[x1, x2 + [6, -8]]


# -- dimensionality reduction --------------------------------------------------------------------------------
def pca_study(x_train: np.ndarray) -> dict[str, Any]:
    """Explained variance, dimensions for 95% and the reconstruction error of the compressed images."""
    pca = PCA().fit(x_train)
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    d = int(np.argmax(cumulative >= 0.95) + 1)
    compressor = PCA(n_components=0.95).fit(x_train)
    recovered = compressor.inverse_transform(compressor.transform(x_train))
    return {
        "pca_first_two_ratio": pca.explained_variance_ratio_[:2].tolist(), "pca_components_95": d,
        "pca_components_95_sklearn": int(compressor.n_components_), "pca_features": int(x_train.shape[1]),
        "pca_reconstruction_mse": float(np.mean((recovered - x_train) ** 2)),
        "cumulative": cumulative, "compressor": compressor, "recovered": recovered[:8],
    }


def jl_min_dim(m: int, eps: float) -> int:
    """Chapter 7's Johnson-Lindenstrauss bound: d >= 4 log(m) / (eps^2 / 2 - eps^3 / 3) dimensions keep every
    squared distance between m points within 1 +/- eps (with high probability), truncated to an integer as the book
    (and scikit-learn's `johnson_lindenstrauss_min_dim`) does."""
    return int(4 * np.log(m) / (eps**2 / 2 - eps**3 / 3))


def random_projection(samples: int, features: int, eps: float, seed: int) -> dict[str, Any]:
    """Project random points to the Johnson-Lindenstrauss dimension and measure how much distances change."""
    rng = np.random.default_rng(seed)
    d = jl_min_dim(samples, eps)
    x = rng.standard_normal((samples, features))
    projected = GaussianRandomProjection(n_components=d, random_state=seed).fit_transform(x)
    i, j = rng.integers(samples, size=(2, 2000))
    keep = i != j
    ratios = np.linalg.norm(projected[i[keep]] - projected[j[keep]], axis=1) / np.linalg.norm(x[i[keep]] - x[j[keep]],
                                                                                           axis=1)
    return {"jl_min_dim_5000_0.1": jl_min_dim(5000, 0.1), "rp_dim": d,
            "rp_distance_ratio_min": float(ratios.min() ** 2), "rp_distance_ratio_max": float(ratios.max() ** 2)}


# -- clustering ----------------------------------------------------------------------------------------------
def kmeans_study(x: np.ndarray, max_k: int, seed: int) -> dict[str, Any]:
    models = {k: KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x) for k in range(1, max_k + 1)}
    inertias = {k: float(m.inertia_) for k, m in models.items()}
    silhouettes = {k: float(silhouette_score(x, m.labels_)) for k, m in models.items() if k > 1}
    return {"models": models, "kmeans_inertia": inertias, "kmeans_silhouette": silhouettes,
            "kmeans_best_k_silhouette": max(silhouettes, key=lambda k: silhouettes[k])}


def segment_image(image: np.ndarray, colors: list[int], seed: int) -> dict[int, np.ndarray]:
    """Replace each pixel by the centre of its k-means colour cluster, for each number of colours."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    out = {}
    for k in colors:
        kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(pixels)
        out[k] = kmeans.cluster_centers_[kmeans.labels_].reshape(image.shape).astype(np.uint8)
    return out


def semi_supervised(labeled: int = 50, percentile_closest: float = 50.0, seed: int = 42) -> dict[str, Any]:
    """The book's ladder on digits (first 1,400 train, rest test): random labels, representative labels, full and
    partial propagation of the representatives' labels to their clusters."""
    x, y = load_digits(return_X_y=True)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    def score(xs: np.ndarray, ys: np.ndarray) -> float:
        return float(LogisticRegression(max_iter=10_000).fit(xs, ys).score(x_test, y_test))

    kmeans = KMeans(n_clusters=labeled, random_state=seed)
    distances = kmeans.fit_transform(x_train)
    representatives = np.argmin(distances, axis=0)
    y_representative = y_train[representatives]  # the book labels these 50 images by hand; we read their labels
    y_propagated = y_representative[kmeans.labels_]
    own_distance = distances[np.arange(len(x_train)), kmeans.labels_]
    keep = np.zeros(len(x_train), dtype=bool)
    for cluster in range(labeled):
        members = kmeans.labels_ == cluster
        keep |= members & (own_distance <= np.percentile(own_distance[members], percentile_closest))
    return {
        "semi_all_labels": score(x_train, y_train),
        "semi_random_50": score(x_train[:labeled], y_train[:labeled]),
        "semi_representative_50": score(x_train[representatives], y_representative),
        "semi_full_propagation": score(x_train, y_propagated),
        "semi_partial_propagation": score(x_train[keep], y_propagated[keep]),
        "semi_partial_label_accuracy": float((y_propagated[keep] == y_train[keep]).mean()),
        "semi_partial_kept": int(keep.sum()), "representatives": representatives.tolist(),
    }


def dbscan_study(seed: int = 42) -> dict[str, Any]:
    x, _ = make_moons(n_samples=1000, noise=0.05, random_state=seed)
    out: dict[str, Any] = {}
    for eps in (0.05, 0.2):
        db = DBSCAN(eps=eps, min_samples=5).fit(x)
        out[f"dbscan_eps{eps}_clusters"] = int(len(set(db.labels_)) - (1 if -1 in db.labels_ else 0))
        out[f"dbscan_eps{eps}_anomalies"] = int((db.labels_ == -1).sum())
    knn = KNeighborsClassifier(n_neighbors=50).fit(db.components_, db.labels_[db.core_sample_indices_])
    out["dbscan_knn_predictions"] = knn.predict([[-0.5, 0], [0, 0.5], [1, -0.1], [2, 1]]).tolist()
    out["moons"], out["dbscan"] = x, db
    return out


def mixture_study(x: np.ndarray, max_k: int, n_init: int, anomaly_percentile: float, seed: int) -> dict[str, Any]:
    gm = GaussianMixture(n_components=3, n_init=n_init, random_state=seed).fit(x)
    bics, aics = {}, {}
    for k in range(1, max_k + 1):
        model = GaussianMixture(n_components=k, n_init=n_init, random_state=seed).fit(x)
        bics[k], aics[k] = float(model.bic(x)), float(model.aic(x))
    densities = gm.score_samples(x)
    threshold = np.percentile(densities, anomaly_percentile)
    bayes = BayesianGaussianMixture(n_components=10, n_init=n_init, max_iter=500, random_state=seed).fit(x)
    return {
        "gmm": gm, "gmm_weights": sorted(gm.weights_.round(3).tolist()), "gmm_converged": bool(gm.converged_),
        "gmm_bic": bics, "gmm_aic": aics, "gmm_best_k_bic": min(bics, key=lambda k: bics[k]),
        "gmm_best_k_aic": min(aics, key=lambda k: aics[k]), "gmm_anomalies": int((densities < threshold).sum()),
        "bayesian_gmm_weights": bayes.weights_.round(2).tolist(),
        "bayesian_gmm_effective_components": int((bayes.weights_ > 0.01).sum()),
    }


# -- the recipe ----------------------------------------------------------------------------------------------
def pca_data(config: Config) -> tuple[np.ndarray, str]:
    if config.data == "mnist":
        x_train, *_ = load_mnist()
        source = MNIST_SOURCE
    else:
        x_train, *_ = load_digits_split(seed=config.seed)
        source = DIGITS_SOURCE
    if config.pca_limit:
        x_train = x_train[: config.pca_limit]
    return x_train, source


def run(config: Config, run_dir: RunDir | str | None = None) -> RunDir:
    from sklearn.datasets import load_sample_image

    run = RunDir.start(run_dir, NAME, config)
    x_pca, pca_source = pca_data(config)
    source = (f"{pca_source} (PCA); scikit-learn's digits (semi-supervised); synthetic blobs, moons and swiss roll "
              "(fixed seeds); scikit-learn's bundled flower.jpg (segmentation)")
    report = Report("Dimensionality reduction and unsupervised learning", NAME, "7-8", source)
    run.write_json("split.json", {"source": source, "seed": config.seed, "pca_images": len(x_pca),
                                  "semi_supervised": "digits: first 1,400 train, last 397 test (the book's split)"})
    results: dict[str, Any] = {"data": config.data}
    pca = pca_study(x_pca)
    results.update({k: v for k, v in pca.items() if k not in ("cumulative", "compressor", "recovered")})
    results.update(random_projection(config.rp_samples, config.rp_features, config.rp_eps, config.seed))
    roll, roll_t = make_swiss_roll(n_samples=config.lle_samples, noise=0.2, random_state=config.seed)
    lle = LocallyLinearEmbedding(n_components=2, n_neighbors=10, random_state=config.seed)
    unrolled = lle.fit_transform(roll)
    results["lle_reconstruction_error"] = float(lle.reconstruction_error_)

    x_blobs, _ = blobs()
    km = kmeans_study(x_blobs, config.kmeans_max_k, config.seed)
    results.update({k: v for k, v in km.items() if k != "models"})
    image = load_sample_image("flower.jpg")[:: config.segmentation_downsample, :: config.segmentation_downsample]
    segmented = segment_image(image, config.segmentation_colors or [10, 8, 6, 4, 2], config.seed)
    results.update(semi_supervised(config.labeled, config.percentile_closest, config.seed))
    db = dbscan_study(config.seed)
    results.update({k: v for k, v in db.items() if k not in ("moons", "dbscan")})
    x_mix = mixture_data(config.seed)
    mix = mixture_study(x_mix, config.gmm_max_k, config.gmm_n_init, config.anomaly_percentile, config.seed)
    results.update({k: v for k, v in mix.items() if k != "gmm"})
    save_estimator(mix["gmm"], run.model_dir, extra={"recipe": NAME, "model": "GaussianMixture(3) on the book's blobs"})
    run.write_json("results.json", results)
    run.log(kind="eval", **{k: v for k, v in results.items() if isinstance(v, (int, float))})

    plots(run, pca, roll, roll_t, unrolled, x_blobs, km, image, segmented, db, x_mix, mix, config.anomaly_percentile)
    write_report(report, run, config, results)
    return run


def write_report(report: Report, run: RunDir, config: Config, results: dict[str, Any]) -> None:
    mnist_note = "" if config.data == "mnist" else "ours on digits (64 pixels); the book's is on MNIST"
    report.compare("PCA: dimensions for 95% of the variance", results["pca_components_95"],
                   BOOK["pca_components_95"], mnist_note)
    report.compare("PCA: first two explained-variance ratios",
                   "(" + ", ".join(f"{v:.4f}" for v in results["pca_first_two_ratio"]) + ")", None, mnist_note)
    report.compare("Johnson-Lindenstrauss dimension, 5,000 samples, eps 0.1", results["jl_min_dim_5000_0.1"],
                   BOOK["jl_min_dim_5000_0.1"])
    report.compare(f"random projection to {results['rp_dim']} dims: squared-distance ratio range",
                   f"{results['rp_distance_ratio_min']:.3f} to {results['rp_distance_ratio_max']:.3f}", None,
                   f"JL promises 1 +/- {config.rp_eps} for {config.rp_samples} points")
    for key, label in (("semi_random_50", f"{config.labeled} random labels"),
                       ("semi_representative_50", f"{config.labeled} representative images"),
                       ("semi_full_propagation", "labels propagated to every cluster member"),
                       ("semi_partial_propagation",
                        f"propagated to the closest {config.percentile_closest:g}% of each cluster")):
        ours = results[key]
        report.compare(f"semi-supervised digits: {label}, test accuracy", round(ours, 3), BOOK[key],
                       f"{100 * (ours - BOOK[key]):+.1f} points" if abs(ours - BOOK[key]) >= 0.0005 else "")
    report.compare("semi-supervised digits: all 1,400 labels", round(results["semi_all_labels"], 3),
                   BOOK["semi_all_labels"], "the ceiling; the book: about 90.9%")
    report.compare("k-means on the blobs: best k by silhouette", results["kmeans_best_k_silhouette"], None,
                   "5 blobs, two of them close")
    report.compare("DBSCAN eps 0.05: clusters", results["dbscan_eps0.05_clusters"], BOOK["dbscan_eps0.05_clusters"],
                   f"the book's failed first try; {results['dbscan_eps0.05_anomalies']} anomalies")
    report.compare("DBSCAN eps 0.2: clusters / anomalies",
                   f"{results['dbscan_eps0.2_clusters']} / {results['dbscan_eps0.2_anomalies']}", None)
    report.compare("Gaussian mixture: best k by BIC / AIC",
                   f"{results['gmm_best_k_bic']} / {results['gmm_best_k_aic']}", None, "3 blobs generated")
    report.compare(f"Gaussian mixture: anomalies (density below percentile {config.anomaly_percentile:g})",
                   results["gmm_anomalies"], None)
    report.compare("Bayesian Gaussian mixture (10 components): weights above 1%",
                   results["bayesian_gmm_effective_components"], None, "it should switch off the extra ones")
    report.table("k-means on the blobs", ["k", "inertia", "silhouette"],
                 [[k, v, results["kmeans_silhouette"].get(k)] for k, v in results["kmeans_inertia"].items()])
    report.table("Gaussian mixtures: information criteria", ["k", "BIC", "AIC"],
                 [[k, v, results["gmm_aic"][k]] for k, v in results["gmm_bic"].items()])
    for name, heading in (("pca_variance", "PCA: explained variance"), ("pca_reconstruction", "PCA compression"),
                          ("lle", "LLE unrolls the swiss roll"), ("kmeans", "k-means: inertia and silhouette"),
                          ("silhouette_diagrams", "Silhouette diagrams"), ("segmentation", "Colour segmentation"),
                          ("dbscan", "DBSCAN on moons"), ("gmm", "Gaussian mixture and anomalies")):
        report.image(heading, run.plots / f"{name}.png", run.path)
    report.write(run.path)


def plots(run: RunDir, pca: dict[str, Any], roll: np.ndarray, roll_t: np.ndarray, unrolled: np.ndarray,
          x_blobs: np.ndarray, km: dict[str, Any], image: np.ndarray, segmented: dict[int, np.ndarray],
          db: dict[str, Any], x_mix: np.ndarray, mix: dict[str, Any], anomaly_percentile: float) -> None:
    from torchbook.plots import line_plot, plt, save_figure

    cumulative = pca["cumulative"]
    line_plot(run.plots / "pca_variance.png", {"cumulative explained variance": (range(1, len(cumulative) + 1),
                                                                                cumulative)},
              f"95% at d = {pca['pca_components_95']}", "dimensions", "explained variance")
    side = int(round(np.sqrt(pca["pca_features"])))
    fig, axes = plt.subplots(2, 4, figsize=(7, 3.6))
    for ax, row in zip(axes.ravel(), pca["recovered"], strict=True):
        ax.imshow(row.reshape(side, side), cmap="binary")
        ax.axis("off")
    fig.suptitle(f"reconstructed from {pca['pca_components_95_sklearn']} components")
    save_figure(fig, run.plots / "pca_reconstruction.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].scatter(roll[:, 0], roll[:, 2], c=roll_t, s=5, cmap="jet")
    axes[0].set_title("swiss roll (x, z)")
    axes[1].scatter(unrolled[:, 0], unrolled[:, 1], c=roll_t, s=5, cmap="jet")
    axes[1].set_title("LLE, 2 dimensions")
    save_figure(fig, run.plots / "lle.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    best = km["models"][min(5, max(km["models"]))]
    axes[0].scatter(x_blobs[:, 0], x_blobs[:, 1], c=best.labels_, s=2, cmap="tab10")
    axes[0].scatter(best.cluster_centers_[:, 0], best.cluster_centers_[:, 1], marker="x", c="k")
    axes[0].set_title(f"k-means, k = {best.n_clusters}")
    axes[1].plot(list(km["kmeans_inertia"]), list(km["kmeans_inertia"].values()), "o-")
    axes[1].set_title("inertia (elbow)")
    axes[2].plot(list(km["kmeans_silhouette"]), list(km["kmeans_silhouette"].values()), "o-")
    axes[2].set_title("silhouette score")
    save_figure(fig, run.plots / "kmeans.png")

    ks = [k for k in (3, 4, 5, 6) if k in km["models"]]
    fig, axes = plt.subplots(1, len(ks), figsize=(3.5 * len(ks), 3.6), squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        labels = km["models"][k].labels_
        coefficients = silhouette_samples(x_blobs, labels)
        position = 0
        for cluster in range(k):
            values = np.sort(coefficients[labels == cluster])
            ax.fill_betweenx(np.arange(position, position + len(values)), 0, values, alpha=0.7)
            position += len(values) + 20
        ax.axvline(km["kmeans_silhouette"][k], color="k", linestyle="--")
        ax.set_title(f"k = {k}")
        ax.set_xlabel("silhouette coefficient")
    save_figure(fig, run.plots / "silhouette_diagrams.png")

    fig, axes = plt.subplots(1, len(segmented) + 1, figsize=(3 * (len(segmented) + 1), 2.6))
    for ax, (title, img) in zip(axes, [("original", image)] + [(f"{k} colours", s) for k, s in segmented.items()],
                                strict=True):
        ax.imshow(img)
        ax.set_title(title)
        ax.axis("off")
    save_figure(fig, run.plots / "segmentation.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    labels = db["dbscan"].labels_
    ax.scatter(db["moons"][:, 0], db["moons"][:, 1], c=labels, s=4, cmap="Paired")
    outliers = db["moons"][labels == -1]
    ax.scatter(outliers[:, 0], outliers[:, 1], c="r", marker="x", s=20, label="anomalies")
    ax.set_title("DBSCAN, eps 0.2")
    save_figure(fig, run.plots / "dbscan.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    densities = mix["gmm"].score_samples(x_mix)
    anomalies = densities < np.percentile(densities, anomaly_percentile)
    ax.scatter(x_mix[:, 0], x_mix[:, 1], c=mix["gmm"].predict(x_mix), s=3, cmap="viridis")
    ax.scatter(x_mix[anomalies, 0], x_mix[anomalies, 1], c="r", marker="*", s=30, label="anomalies")
    ax.scatter(mix["gmm"].means_[:, 0], mix["gmm"].means_[:, 1], c="k", marker="x", s=60)
    ax.legend()
    save_figure(fig, run.plots / "gmm.png")


RECIPE = Recipe(NAME, "7-8", "PCA, random projection, LLE, k-means, segmentation, semi-supervised, DBSCAN, GMM",
                Config, run)
