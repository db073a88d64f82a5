"""Novel cell types: is this cell of a type the model was not trained on? One module per concept:

- :mod:`.scores`: the per-cell scores of one prediction pass (``softmax``, ``energy``,
  ``mahalanobis``, ``knn``) and the class statistics they are measured against;
- :mod:`.expression`: the PCA of the training cells' expression and its ``pca_*`` scores;
- :mod:`.query`: the scores of a whole query (``query_density``, ``query_combined``);
- :mod:`.calibration`: conformal thresholds, the ``combined`` scores, AUROC and FPR;
- :mod:`.record`: what a checkpoint stores (:class:`NoveltyRecord`) and every per-cell score it allows;
- :mod:`.rule`: when a cell is ``Unassigned`` (:class:`NoveltyRule`, :func:`choose_rule`,
  :func:`assign_labels`).
"""

from model.novelty.calibration import Calibration, ScoreCombination, auroc, calibrate, conformal_threshold, fpr_at_tpr
from model.novelty.expression import PCA_COMPONENTS, ExpressionPCA
from model.novelty.query import QUERY_SHIFT_SHARE, QueryDensity, query_scores, query_shift
from model.novelty.record import NoveltyRecord, novelty_scores
from model.novelty.rule import PUBLISHED_RULE, UNASSIGNED, NoveltyRule, NoveltySettings, assign_labels, choose_rule, query_rule
from model.novelty.scores import (
    DEFAULT_SCORE,
    EXPRESSION_SCORES,
    NETWORK_SCORES,
    PCA_SCORES,
    QUERY_SCORES,
    SCORE_MEANINGS,
    SCORES,
    ClassStatistics,
    softmax_score,
)

__all__ = ["DEFAULT_SCORE", "EXPRESSION_SCORES", "NETWORK_SCORES", "PCA_COMPONENTS", "PCA_SCORES", "PUBLISHED_RULE", "QUERY_SCORES",
           "QUERY_SHIFT_SHARE", "SCORE_MEANINGS", "SCORES", "UNASSIGNED", "Calibration", "ClassStatistics", "ExpressionPCA", "NoveltyRecord", "NoveltyRule",
           "NoveltySettings", "QueryDensity", "ScoreCombination", "assign_labels", "auroc", "calibrate", "choose_rule", "conformal_threshold",
           "fpr_at_tpr", "novelty_scores", "query_rule", "query_scores", "query_shift", "softmax_score"]
