"""Cross-fitted stacking on out-of-fold rows (the folds themselves are common.data.partition's).

Cross-fitting: each CNN trained on fold k's train side exports the rows of
fold k's images; together these are the out-of-fold set (every image once, each row made by a model that never
saw its patient). A stacker for outer fold k is fitted on the other folds' rows only and predicts fold k:

    oof = OutOfFold(folds=..., labels=..., patients=..., logits={"densenet121": (N, 2), ...}, features=(N, F))
    stacked = cross_fit(oof, logistic_regression_stacker(), select_fraction=0.2, seed=0)
    stacked.prob_malignant       # (N,) pooled out-of-fold P(malignant)
    stacked.fit_rows[k]          # the rows the stacker of fold k was fitted on (never a fold-k patient)
"""

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common.core.errors import PipelineError
from common.data.partition import assign_groups
from common.data.records import majority_labels
from common.evaluation.metrics import softmax
from common.fusion.mlp import MlpSettings, fit_mlp, mlp_logits

# ------------------------------------------------------------------------------------- cross-fitted stacking


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold rows, one per image: each made by the models of the fold whose test set holds the image."""

    folds: np.ndarray  # (N,) int, the outer fold of each row
    labels: np.ndarray  # (N,) int, 0 benign, 1 malignant; -1 where hidden from a stacker (rows it predicts)
    patients: np.ndarray  # (N,) str
    logits: dict[str, np.ndarray]  # model name -> (N, 2) logits of that CNN
    features: np.ndarray | None = None  # (N, F), e.g. heatmap features for an MLP
    rows: np.ndarray | None = None  # (N,) positions in the full out-of-fold set; None = the full set itself

    def __post_init__(self):
        n_rows = len(self.folds)
        arrays = {"labels": self.labels, "patients": self.patients, "features": self.features,
                  **{f"logits[{name}]": value for name, value in self.logits.items()}}
        wrong = [name for name, value in arrays.items() if value is not None and len(value) != n_rows]
        if wrong:
            raise PipelineError(f"out-of-fold arrays {', '.join(wrong)} do not have one row per image ({n_rows})")
        if any(np.ndim(value) != 2 or np.shape(value)[1] != 2 for value in self.logits.values()):
            raise PipelineError("out-of-fold logits must be (N, 2) per model")

    def take(self, rows: np.ndarray, *, hide_labels: bool = False) -> "OutOfFold":
        """The given rows (positions in this set); hide_labels replaces their labels by -1."""
        rows = np.asarray(rows, dtype=np.int64)
        labels = np.full(len(rows), -1, dtype=np.int64) if hide_labels else self.labels[rows]
        return OutOfFold(self.folds[rows], labels, self.patients[rows],
                         {name: value[rows] for name, value in self.logits.items()},
                         None if self.features is None else self.features[rows],
                         rows if self.rows is None else self.rows[rows])

    def concatenate(self, other: "OutOfFold") -> "OutOfFold":
        """These rows followed by `other`'s (both taken from one out-of-fold set)."""
        def both(first, second):
            return None if first is None or second is None else np.concatenate([first, second])
        return OutOfFold(both(self.folds, other.folds), both(self.labels, other.labels),
                         both(self.patients, other.patients),
                         {name: both(value, other.logits[name]) for name, value in self.logits.items()},
                         both(self.features, other.features), both(self.rows, other.rows))


# fit_predict(fit_rows, select_rows, predict_rows) -> (len(predict_rows),) P(malignant). The stacker learns its
# weights on fit_rows, picks any epoch or hyperparameter on select_rows (other patients), and predicts
# predict_rows, whose labels it is given as -1.
FitPredict = Callable[[OutOfFold, OutOfFold, OutOfFold], np.ndarray]


@dataclass(frozen=True)
class CrossFit:
    prob_malignant: np.ndarray  # (N,) pooled out-of-fold P(malignant)
    fit_rows: dict[int, np.ndarray]  # outer fold -> row positions the stacker was fitted on
    select_rows: dict[int, np.ndarray]  # outer fold -> row positions it selected its hyperparameters on


def _check_patients_in_one_fold(oof: OutOfFold) -> None:
    folds_of_patient: dict[str, set[int]] = defaultdict(set)
    for patient, fold in zip(oof.patients, oof.folds):
        folds_of_patient[str(patient)].add(int(fold))
    split_patients = sorted(patient for patient, found in folds_of_patient.items() if len(found) > 1)
    if split_patients:
        raise PipelineError(f"out-of-fold rows put patient(s) {', '.join(split_patients[:5])} in two folds; "
                            "cross-fitting needs patient-level folds")


def cross_fit(oof: OutOfFold, fit_predict: FitPredict, *, select_fraction: float = 0.2, seed: int = 0) -> CrossFit:
    """For each outer fold k: fit on the other folds' rows (select_fraction of their patients per class held out
    as select rows, seeded with seed + k), predict fold k. Returns the pooled predictions and the rows used."""
    _check_patients_in_one_fold(oof)
    prob_malignant = np.full(len(oof.folds), np.nan)
    fit_rows, select_rows = {}, {}
    for fold in sorted(int(fold) for fold in np.unique(oof.folds)):
        outer_test = np.flatnonzero(oof.folds == fold)
        others = np.flatnonzero(oof.folds != fold)
        side_of = assign_groups(majority_labels(oof.patients[others], oof.labels[others]),
                                {"fit": 1.0 - select_fraction, "select": select_fraction}, seed + fold)
        sides = np.array([side_of[str(patient)] for patient in oof.patients[others]])
        fit_rows[fold], select_rows[fold] = others[sides == "fit"], others[sides == "select"]
        predicted = np.asarray(fit_predict(oof.take(fit_rows[fold]), oof.take(select_rows[fold]),
                                           oof.take(outer_test, hide_labels=True)), dtype=np.float64)
        if predicted.shape != outer_test.shape:
            raise PipelineError(f"the stacker returned {predicted.shape} predictions for fold {fold}'s "
                                f"{len(outer_test)} rows; it must return one P(malignant) per row")
        prob_malignant[outer_test] = predicted
    return CrossFit(prob_malignant, fit_rows, select_rows)


def soft_vote(logits: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) mean of the CNNs' P(malignant): needs no fitting, so no cross-fitting."""
    return np.mean([softmax(np.asarray(value, dtype=np.float64))[:, 1] for value in logits.values()], axis=0)


def logit_margins(rows: OutOfFold) -> np.ndarray:
    """(N, M) each CNN's malignant-minus-benign logit (softmax depends on nothing else), models by sorted name."""
    return np.stack([rows.logits[name][:, 1] - rows.logits[name][:, 0] for name in sorted(rows.logits)], axis=1)


def logistic_regression_stacker(*, c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)) -> FitPredict:
    """Logistic regression on the CNNs' logit margins (standardised on the fit rows): the inverse regularisation
    strength C with the lowest log loss on the select rows is kept, then refitted on fit + select rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def fit(rows: OutOfFold, c: float):
        if len(np.unique(rows.labels)) < 2:
            raise PipelineError("the logistic-regression stacker's fit rows hold one class only; use more folds "
                                "or patients")
        return make_pipeline(StandardScaler(), LogisticRegression(C=c)).fit(logit_margins(rows), rows.labels)

    def fit_predict(fit_rows: OutOfFold, select_rows: OutOfFold, predict_rows: OutOfFold) -> np.ndarray:
        # A fit on a few thousand rows of M features gains nothing from BLAS threads; on a busy machine their
        # spin-waits made each L-BFGS step take milliseconds (5 folds x 5 fits: seconds instead of a fraction).
        with threadpool_limits(limits=1):
            return _select_and_fit(fit_rows, select_rows, predict_rows)

    def _select_and_fit(fit_rows: OutOfFold, select_rows: OutOfFold, predict_rows: OutOfFold) -> np.ndarray:
        best_c = c_grid[0]
        if len(select_rows.labels) and len(c_grid) > 1:
            losses = [log_loss(select_rows.labels, fit(fit_rows, c).predict_proba(logit_margins(select_rows))[:, 1],
                               labels=[0, 1]) for c in c_grid]
            best_c = c_grid[int(np.argmin(losses))]
        return fit(fit_rows.concatenate(select_rows), best_c).predict_proba(logit_margins(predict_rows))[:, 1]

    return fit_predict


def mlp_stacker(settings: MlpSettings, device: torch.device, desc: str):
    """cross_fit's fit_predict hook for the MLP on the rows' features."""
    def fit_predict(fit: OutOfFold, select: OutOfFold, predict: OutOfFold) -> np.ndarray:
        features = np.concatenate([fit.features, select.features, predict.features])
        labels = np.concatenate([fit.labels, select.labels, predict.labels])  # predict's are -1, never used
        patients = np.concatenate([fit.patients, select.patients, predict.patients]).astype(str)
        fit_rows = np.arange(len(fit.folds))
        select_rows = np.arange(len(fit.folds), len(fit.folds) + len(select.folds))
        mlp, standardizer, _ = fit_mlp(features, labels, patients, fit_rows, select_rows, settings, device, desc)
        return softmax(mlp_logits(mlp, standardizer(predict.features), device))[:, 1]
    return fit_predict
