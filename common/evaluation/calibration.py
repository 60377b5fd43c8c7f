"""Whether a P(malignant) is a probability: calibration metrics, reliability curves and temperature scaling.

    calibration_metrics(labels, prob)        # {'brier', 'log_loss', 'ece', 'ece_adaptive'} on one set of rows
    reliability_curve(labels, prob)          # per non-empty bin: mean P, observed malignant share, rows
    temperature = fit_temperature(prob, labels)          # on held-out rows only
    scaled = apply_temperature(prob, temperature)        # sigmoid(logit(p) / T): never moves p across 0.5

Definitions (every table and docs/calibration.md say the same):
- Brier score: mean (P(malignant) - label)^2 (scikit-learn's brier_score_loss).
- Log loss: mean -log P(true class), P clipped to [eps, 1 - eps] with float64's eps, as scikit-learn's log_loss.
- ECE: sum over bins of (rows in bin / rows) x |observed malignant share - mean P(malignant)| in the bin, on
  P(malignant) (the quantity the reliability diagram plots, as scikit-learn's calibration_curve bins it).
  'ece': ECE_BINS equal-width bins on [0, 1]; 'ece_adaptive': ECE_BINS equal-mass bins, their edges the quantiles
  of the evaluated rows' probabilities (calibration_curve's strategy='quantile'). In the patient bootstrap the
  adaptive edges stay those of the data as it is: the bins are part of the metric's definition, not re-estimated.

Temperature scaling (Guo et al. 2017): one scalar T > 0 per model, fitted by minimising the log loss of
sigmoid(logit(p) / T) on held-out rows; for a CNN logit(p) is its malignant-minus-benign logit, so this is the
softmax of logits / T. T > 1 softens an over-confident model. Dividing a logit by T > 0 keeps its sign, so no
decision at 0.5 changes at image level (a patient's mean probability can move, so patient-level decisions may).
"""

import numpy as np

from common.core.errors import PipelineError

ECE_BINS = 15
CALIBRATION_METRICS = ("brier", "log_loss", "ece", "ece_adaptive")
CALIBRATION_NAMES = {"brier": "Brier score", "log_loss": "log loss", "ece": f"ECE ({ECE_BINS} equal-width bins)",
                     "ece_adaptive": f"adaptive ECE ({ECE_BINS} equal-mass bins)"}
BINNING = {"ece": "uniform", "ece_adaptive": "quantile"}  # scikit-learn calibration_curve's strategy names
LOG_LOSS_EPS = float(np.finfo(np.float64).eps)
TEMPERATURE_BOUNDS = (1e-2, 1e2)  # a fitted T at a bound means the held-out rows do not pin it down


# ------------------------------------------------------------------------------------ bins


def bin_edges(prob, strategy: str, bins: int = ECE_BINS) -> np.ndarray:
    """(bins + 1,) edges: equal-width on [0, 1] ('uniform') or at the quantiles of prob ('quantile')."""
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, bins + 1)
    return np.percentile(np.asarray(prob, dtype=np.float64), np.linspace(0, 100, bins + 1))


def bin_of_rows(prob, edges: np.ndarray) -> np.ndarray:
    """(N,) each row's bin, as calibration_curve assigns it (a probability on an inner edge goes to the lower bin)."""
    return np.searchsorted(edges[1:-1], np.asarray(prob, dtype=np.float64))


# ------------------------------------------------------------------------------------ metrics


def true_class_probability(labels, prob) -> np.ndarray:
    """(N,) P(the row's true class), clipped as scikit-learn's log_loss clips it."""
    labels, prob = np.asarray(labels), np.asarray(prob, dtype=np.float64)
    return np.clip(np.where(labels == 1, prob, 1.0 - prob), LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)


def calibration_metrics(labels, prob, *, adaptive_edges: np.ndarray | None = None) -> dict[str, float | None]:
    """Brier score, log loss, ECE and adaptive ECE of one set of rows (None for no rows). adaptive_edges: the
    equal-mass bins to use (default: this set's own quantiles)."""
    labels, prob = np.asarray(labels, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    if not len(labels):
        return dict.fromkeys(CALIBRATION_METRICS)
    edges = {"ece": bin_edges(prob, "uniform"),
             "ece_adaptive": bin_edges(prob, "quantile") if adaptive_edges is None else adaptive_edges}
    result = {"brier": float(np.mean((prob - labels) ** 2)),
              "log_loss": float(-np.mean(np.log(true_class_probability(labels, prob))))}
    for name, name_edges in edges.items():
        bins = bin_of_rows(prob, name_edges)
        size = np.bincount(bins, minlength=ECE_BINS)
        gap = np.bincount(bins, weights=labels, minlength=ECE_BINS) - np.bincount(bins, weights=prob,
                                                                                  minlength=ECE_BINS)
        result[name] = float(np.abs(gap).sum() / size.sum())  # sum_b n_b/N |mean y - mean p| = sum_b |S_y - S_p|/N
    return result


def resampled_calibration(labels, prob, group_of_row, counts: np.ndarray, *,
                          adaptive_edges: np.ndarray) -> dict[str, np.ndarray]:
    """Each calibration metric, (R,), of the rows weighted by counts[r, group_of_row] (the patient bootstrap's
    resamples; common.evaluation.stats.resampled_metrics does the same for the other metrics). Per group, sums of
    each row's loss and, per bin, of labels and probabilities; each resample is then a (R, G) @ (G, ...) product."""
    labels, prob = np.asarray(labels, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    group_of_row = np.asarray(group_of_row)
    n_groups = counts.shape[1]

    def per_group(values):  # (G,) sum of values over each group's rows
        return np.bincount(group_of_row, weights=values, minlength=n_groups)

    rows = counts @ per_group(np.ones_like(prob))  # (R,)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = {"brier": counts @ per_group((prob - labels) ** 2) / rows,
                  "log_loss": counts @ per_group(-np.log(true_class_probability(labels, prob))) / rows}
        for name, edges in (("ece", bin_edges(prob, "uniform")), ("ece_adaptive", adaptive_edges)):
            cell = group_of_row * ECE_BINS + bin_of_rows(prob, edges)  # (group, bin) of each row, flattened
            gap = (np.bincount(cell, weights=labels - prob, minlength=n_groups * ECE_BINS)
                   .reshape(n_groups, ECE_BINS))  # (G, B): sum of label - P over the group's rows in each bin
            result[name] = np.abs(counts @ gap).sum(axis=1) / rows
    return result


def reliability_curve(labels, prob, *, strategy: str = "uniform", bins: int = ECE_BINS) -> dict[str, list]:
    """The reliability diagram's points (scikit-learn's calibration_curve) with the rows in each non-empty bin."""
    from sklearn.calibration import calibration_curve

    labels, prob = np.asarray(labels), np.asarray(prob, dtype=np.float64)
    observed, mean_predicted = calibration_curve(labels, prob, n_bins=bins, strategy=strategy)
    size = np.bincount(bin_of_rows(prob, bin_edges(prob, strategy, bins)), minlength=bins)
    return {"mean_predicted": mean_predicted.tolist(), "observed": observed.tolist(),
            "rows": size[size > 0].astype(int).tolist(), "strategy": strategy, "bins": bins}


# ------------------------------------------------------------------------------------ temperature scaling


def logit(prob) -> np.ndarray:
    """log(p / (1 - p)), with p clipped as the log loss clips it (a probability of exactly 0 or 1 stays finite)."""
    prob = np.clip(np.asarray(prob, dtype=np.float64), LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    return np.log(prob) - np.log1p(-prob)


def apply_temperature(prob, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T)."""
    from scipy.special import expit  # no overflow warning where logit(p) / T is large

    return expit(logit(prob) / float(temperature))


def fit_temperature(prob, labels, *, rows_named: str = "held-out rows") -> float:
    """The T in TEMPERATURE_BOUNDS minimising the log loss of apply_temperature(prob, T) on these (held-out) rows;
    1-D, so a bounded scalar search on log T (the loss is convex in 1/T). rows_named: what the rows are, for the
    error when there are none."""
    from scipy.optimize import minimize_scalar

    if not len(labels):
        raise PipelineError(f"no {rows_named} to fit a temperature on: temperature scaling and conformal sets need "
                            "held-out patients (a single split with val patients, or a K-fold run)")
    margins, labels = logit(prob), np.asarray(labels, dtype=np.float64)
    signs = 2.0 * labels - 1.0  # +1 malignant, -1 benign: -log sigmoid(sign * z / T) is the row's loss

    def loss(log_temperature: float) -> float:
        return float(np.mean(np.logaddexp(0.0, -signs * margins / np.exp(log_temperature))))

    low, high = np.log(TEMPERATURE_BOUNDS)
    found = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))

