"""Part I (chapters 3-9): the book's printed figures, reproduced by the library functions the recipes run.

Every expected value below is the book's (see ../shared/BOOK_MAP.md, Part I). Tolerances are the book's own
rounding unless a comment gives another reason.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import needs_housing
from threadpoolctl import threadpool_limits

from torchbook.config import build_config
from torchbook.recipes import linear_models as lm
from torchbook.recipes import mlp_sklearn, trees_ensembles, unsupervised


@pytest.fixture(autouse=True)
def one_blas_thread():
    """These matrices are small: BLAS threads only fight the other test workers for the 2 cores."""
    with threadpool_limits(1), warnings.catch_warnings():
        # the book's SVC(probability=True), deprecated in scikit-learn 1.9 (see trees_ensembles.voters)
        warnings.filterwarnings("ignore", message=".*`probability` parameter was deprecated", category=FutureWarning)
        yield


# -- chapter 4 -----------------------------------------------------------------------------------------------
def test_normal_equation_and_gradient_descents_give_the_books_thetas():
    x, y = lm.linear_data()
    assert x.shape == y.shape == (200, 1)
    normal = lm.normal_equation(x, y).ravel()
    np.testing.assert_allclose(normal, [3.69084138, 3.32960458], atol=5e-9)  # the book prints 8 decimals
    lstsq = np.linalg.lstsq(lm.add_bias(x), y, rcond=None)[0].ravel()  # parity with NumPy's least squares
    np.testing.assert_allclose(normal, lstsq, rtol=1e-10)
    batch, path = lm.batch_gradient_descent(x, y, lr=0.1, epochs=1000)
    np.testing.assert_allclose(batch.ravel(), normal, atol=1e-8)
    assert len(path) == 1001
    sgd, _ = lm.stochastic_gradient_descent(x, y, epochs=50, t0=5, t1=50)
    np.testing.assert_allclose(sgd.ravel(), lm.BOOK["sgd_theta"], atol=5e-4)  # the book, as quoted: "about (3.698, 3.307)"
    # Issue #15 (from the book's text) says ours equals the book's printed SGD theta to 8 decimals, 3.69826475 and
    # 3.30748311; our quoted source gives only the rounded pair above, so the 8 decimals rest on the issue.
    np.testing.assert_allclose(sgd.ravel(), [3.69826475, 3.30748311], atol=1e-8)
    minibatch, _ = lm.minibatch_gradient_descent(x, y)
    assert np.abs(minibatch.ravel() - normal).max() < 0.15  # no book figure: it lands near the optimum


def test_polynomial_regression_and_iris_logistic_models_match_the_book():
    config = lm.Config()
    from sklearn.linear_model import LinearRegression
    from sklearn.preprocessing import PolynomialFeatures

    x, y = lm.quadratic_data()
    model = LinearRegression().fit(PolynomialFeatures(degree=2, include_bias=False).fit_transform(x), y)
    assert model.intercept_[0] == pytest.approx(2.00540719, abs=5e-9)
    np.testing.assert_allclose(model.coef_.ravel(), [1.11022126, 0.50526985], atol=5e-9)
    iris = lm.iris_models(config)["results"]
    assert iris["iris_boundary"] == pytest.approx(1.65, abs=0.005)
    np.testing.assert_allclose(iris["softmax_proba"], [0.0, 0.04, 0.96], atol=0.005)
    assert iris["softmax_prediction"] == 2


def test_regularized_models_predict_the_books_values_at_1_5():
    """Ridge, ridge by SGD, lasso and elastic net: the book prints their predictions for x = 1.5 to 8 decimals (7 for
    the elastic net)."""
    rows = {name: ours for name, ours, _, _ in lm.regularized_models(42)}
    for name, book in lm.BOOK_REGULARIZED_AT_1_5.items():
        assert rows[name] == pytest.approx(book, abs=5e-9 if len(str(book)) == 10 else 5e-8), name


def test_early_stopping_keeps_the_best_validation_epoch():
    x, y = lm.quadratic_data(100)
    model, best_epoch, _, val_curve = lm.early_stopping_sgd(x[:50], y[:50], x[50:], y[50:], epochs=40)
    assert val_curve[best_epoch] == min(val_curve)
    from sklearn.metrics import root_mean_squared_error

    assert root_mean_squared_error(y[50:], model.predict(x[50:])) == pytest.approx(min(val_curve), rel=1e-12)


# -- chapters 5-6 --------------------------------------------------------------------------------------------
def test_iris_tree_and_moons_regularization_match_the_book():
    _, iris = trees_ensembles.iris_tree()
    assert iris["iris_root_feature"] == "petal length"
    assert iris["iris_root_threshold"] == pytest.approx(2.45, abs=1e-7)  # trees keep thresholds in float32
    np.testing.assert_allclose(iris["iris_proba"], [0.0, 0.907, 0.093], atol=5e-4)
    moons = trees_ensembles.moons_regularization()
    assert moons["moons_tree_unregularized"] == pytest.approx(0.898, abs=1e-9)
    assert moons["moons_tree_min_leaf5"] == pytest.approx(0.92, abs=1e-9)


def test_moons_ensembles_table_matches_the_book():
    """The book's table on 500 moons: exact accuracies on the 125 test points (steps of 0.008)."""
    from sklearn.ensemble import BaggingClassifier, StackingClassifier, VotingClassifier
    from sklearn.ensemble import RandomForestClassifier as Forest
    from sklearn.tree import DecisionTreeClassifier

    config = trees_ensembles.Config()
    x_train, x_test, y_train, y_test = trees_ensembles.moons(config)
    hard = VotingClassifier(trees_ensembles.voters(42)).fit(x_train, y_train)
    scores = {name: est.score(x_test, y_test) for name, est in hard.named_estimators_.items()}
    assert scores == pytest.approx({"lr": 0.864, "rf": 0.896, "svc": 0.896}, abs=1e-9)
    assert hard.score(x_test, y_test) == pytest.approx(0.912, abs=1e-9)
    soft = VotingClassifier(trees_ensembles.voters(42, probability=True), voting="soft")
    assert soft.fit(x_train, y_train).score(x_test, y_test) == pytest.approx(0.92, abs=1e-9)
    bagging = BaggingClassifier(DecisionTreeClassifier(), n_estimators=500, oob_score=True, n_jobs=1,
                                random_state=42).fit(x_train, y_train)
    assert bagging.oob_score_ == pytest.approx(0.896, abs=1e-9)
    assert bagging.score(x_test, y_test) == pytest.approx(0.92, abs=1e-9)
    stacking = StackingClassifier(trees_ensembles.voters(42, probability=True), final_estimator=Forest(random_state=43), cv=5)
    assert stacking.fit(x_train, y_train).score(x_test, y_test) == pytest.approx(0.928, abs=1e-9)


def test_gradient_boosting_by_hand_gives_the_books_predictions_and_early_stopping_keeps_53_trees():
    gb = trees_ensembles.gradient_boosting_by_hand()
    # the book prints 0.57356534, 0.0405142, 0.66914249 (8 decimals, the middle one 7)
    np.testing.assert_allclose(gb["gbrt_by_hand"], trees_ensembles.BOOK_GBRT_BY_HAND, rtol=0, atol=5e-8)
    np.testing.assert_allclose(gb["gbrt_by_hand"], gb["gbrt_sklearn_3_trees"], rtol=1e-10)  # and scikit-learn's
    assert gb["gbrt_early_stopping_trees"] == 53


@needs_housing
def test_histogram_boosting_on_housing_is_near_the_books_47600():
    """The book: "about 47,600" (10-fold CV RMSE); ours within 2% (measured 47,397)."""
    rmse = trees_ensembles.housing_boosting(42)["housing_hgb_cv_rmse"]
    assert rmse == pytest.approx(trees_ensembles.BOOK_HGB_CV_RMSE, rel=0.02)


# -- chapters 7-8 --------------------------------------------------------------------------------------------
def test_semi_supervised_ladder_matches_the_book():
    semi = unsupervised.semi_supervised(labeled=50, percentile_closest=50)
    assert semi["semi_random_50"] == pytest.approx(0.758, abs=5e-4)
    assert semi["semi_representative_50"] == pytest.approx(0.834, abs=5e-4)
    assert semi["semi_full_propagation"] == pytest.approx(0.869, abs=5e-4)
    assert semi["semi_partial_propagation"] == pytest.approx(0.884, abs=5e-4)
    assert semi["semi_partial_label_accuracy"] > 0.95  # the kept propagated labels are mostly right
    assert semi["semi_all_labels"] == pytest.approx(0.909, abs=5e-4)  # the book: "about 90.9%" with all labels


def test_dbscan_first_try_finds_the_books_seven_clusters():
    db = unsupervised.dbscan_study(42)
    assert db["dbscan_eps0.05_clusters"] == 7  # the book's eps=0.05 on 1,000 moons: seven clusters
    assert db["dbscan_eps0.2_clusters"] == 2 and db["dbscan_eps0.2_anomalies"] == 0  # eps 0.2: the two moons


def test_johnson_lindenstrauss_bound_and_random_projection_keep_distances():
    from sklearn.random_projection import johnson_lindenstrauss_min_dim

    assert unsupervised.jl_min_dim(5000, 0.1) == 7300  # the book's equation, the book's figure
    for m, eps in ((5000, 0.1), (300, 0.3), (60_000, 0.05), (10, 0.5)):  # parity with scikit-learn's bound
        assert unsupervised.jl_min_dim(m, eps) == int(johnson_lindenstrauss_min_dim(m, eps=eps)), (m, eps)
    rp = unsupervised.random_projection(samples=300, features=3000, eps=0.3, seed=42)
    assert rp["jl_min_dim_5000_0.1"] == 7300
    assert 0.7 <= rp["rp_distance_ratio_min"] <= 1 <= rp["rp_distance_ratio_max"] <= 1.3


def test_pca_keeps_95_percent_and_gaussian_mixture_finds_three_blobs():
    from sklearn.datasets import load_digits

    x = load_digits().data
    pca = unsupervised.pca_study(x)
    # an independent reference: the singular values of the centred data give each component's share of variance
    singular = np.linalg.svd(x - x.mean(0), compute_uv=False)
    shares = singular**2 / (singular**2).sum()
    d = int(np.argmax(np.cumsum(shares) >= 0.95) + 1)
    assert pca["pca_components_95"] == pca["pca_components_95_sklearn"] == d < 64
    np.testing.assert_allclose(pca["pca_first_two_ratio"], shares[:2], rtol=1e-8)
    # projecting on d components loses exactly the discarded components' variance
    assert pca["pca_reconstruction_mse"] == pytest.approx((singular[d:] ** 2).sum() / x.size, rel=1e-8)
    mix = unsupervised.mixture_study(unsupervised.mixture_data(), max_k=5, n_init=2, anomaly_percentile=2, seed=42)
    assert mix["gmm_best_k_bic"] == 3 and mix["gmm_converged"]
    assert mix["gmm_anomalies"] == 25  # 2% of 1,250 points
    assert mix["bayesian_gmm_effective_components"] == 3


# -- chapter 9 -----------------------------------------------------------------------------------------------
def test_perceptron_predicts_like_the_book_and_is_sgd_with_perceptron_loss():
    p = mlp_sklearn.perceptron_study()
    assert p["perceptron_predictions"] == [True, False]
    assert p["perceptron_equals_sgd"] and p["perceptron_train_accuracy"] == 1.0


@needs_housing
def test_sklearn_mlp_regressor_on_housing_is_near_the_book(tmp_path):
    """Book: test RMSE 0.533 and `best_validation_score_` 0.7915 (the R2 on early stopping's validation data) with
    scikit-learn's copy of the data. Ours imputes the archive's 207 missing bedroom counts, so the test allows 5% on
    the RMSE and 0.02 on that R2 (measured 0.529 and 0.783)."""
    import json

    run = mlp_sklearn.run(build_config(mlp_sklearn.Config, preset="book"), tmp_path / "run")
    results = json.loads((run.path / "results.json").read_text())
    assert results["mlp_test_rmse"] == pytest.approx(mlp_sklearn.BOOK["mlp_test_rmse"], rel=0.05)
    assert results["mlp_best_early_stopping_r2"] == pytest.approx(mlp_sklearn.BOOK["mlp_best_early_stopping_r2"],
                                                                  abs=0.02)
    assert results["mlp_test_rmse"] < results["linear_test_rmse"]


def mnist_or_skip() -> None:
    """The MNIST figures need MNIST: downloaded once (or placed in $TORCHBOOK_MIRROR); skipped, with the reason, on a
    machine that can reach neither. The offline digits runs are tested in the default suite."""
    from torchbook.data.sources import load_mnist
    from torchbook.errors import DataUnavailable

    try:
        load_mnist()
    except DataUnavailable as e:
        pytest.skip(f"MNIST is not obtainable here: {e}")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the book's KNN cross-validation on 60,000 images
@pytest.mark.optional_data("MNIST is downloaded; no offline copy exists here")
def test_classification_on_mnist_reproduces_the_books_figures(tmp_path):
    """Book: precision 0.837, recall 0.651, F1 0.733, ROC AUC 0.960; forest F1 0.927, AUC 0.998; multilabel KNN
    macro F1 0.976; the 3-fold accuracies of the SGD 5-detector (0.95035, 0.96035, 0.9604), the dummy (0.90965 each:
    the share of non-5s in each stratified fold, exact) and the scaled multiclass SGD (0.8983, 0.891, 0.9018).
    Tolerance 0.01: the same estimators and seeds, but other library versions."""
    import json

    from torchbook.recipes import classification

    mnist_or_skip()
    run = classification.run(build_config(classification.Config, preset="book"), tmp_path / "run")
    r = json.loads((run.path / "results.json").read_text())
    for key, book in classification.BOOK.items():
        assert r[key] == pytest.approx(book, abs=0.01), key
    for key, book_folds in classification.BOOK_FOLDS.items():
        np.testing.assert_allclose(r[key], book_folds, atol=0.01, err_msg=key)
    np.testing.assert_allclose(r["dummy_cv_folds"], classification.BOOK_FOLDS["dummy_cv_folds"], atol=1e-9)  # counts


@pytest.mark.slow
@pytest.mark.timeout(1200)  # PCA of 60,000 images
@pytest.mark.optional_data("MNIST is downloaded; no offline copy exists here")
def test_pca_on_mnist_keeps_154_components_for_95_percent(tmp_path):
    from torchbook.data.sources import load_mnist

    mnist_or_skip()
    x_train, *_ = load_mnist()
    assert unsupervised.pca_study(x_train)["pca_components_95"] == 154
