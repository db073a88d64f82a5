# Sourced by the experiment scripts in this folder: options, the gene vocabulary, pretraining,
# and running baselines and scBERT on identical splits. Not meant to be run by itself.
#
# Options every experiment script takes (defaults in brackets):
#   --data FILE [FILE ...]   labelled cells, raw counts or log-normalised (.h5ad, 10x, csv...)
#   --label-key KEY          obs column with the cell types [celltype]
#   --out DIR                output folder [runs/paper/<experiment>]
#   --unlabelled FILE ...    unlabelled cells for pretraining
#   (default pretraining)    leakage-free: every run (fold x seed) pretrains its own encoder on the
#                            unlabelled cells plus that run's training cells (python -m scripts.benchmark
#                            --pretrain-per-split), so no test cell is seen by pretraining or gene2vec
#   --pretrain-once          pretrain one encoder on the unlabelled cells plus ALL labelled cells
#                            (without labels; the test cells of every run included), as before; the
#                            tables then say so
#   --pretrained CKPT        skip pretraining and fine-tune this checkpoint (e.g. a converted
#                            panglao_pretrain.pt; its genes then fix the vocabulary)
#   --published              published model and training size (dim 200, depth 6, 10 heads of 64,
#                            batch 3 x 60 accumulation, lr 1e-4, up to 100 fine-tuning epochs)
#                            instead of the CPU preset (dim 32, depth 2, 4 heads of 8, 2,000 genes;
#                            fine-tuning lr 1e-4, head dropout 0.3, weight decay 0.05, <= 10 epochs)
#   --n-genes N              genes kept (highest variance of log expression) [2000; 16906 with --published]
#   --vocab FILE             use this gene list instead (e.g. the published 16,906 Panglao genes)
#   --seeds "0 1 2"          seeds for the baselines [0 1 2]
#   --scbert-seeds "0"       seeds for scBERT, which is much slower [0]
#   --folds K                K of the stratified K-fold [5]
#   --min-genes N            drop cells expressing fewer genes [200, as published; 0 keeps all]
#   --methods "..."          baselines to run [logreg_l1 logreg_l2 knn_pca centroid_corr, + celltypist if installed]
#   --pretrain-epochs N      [10]
#   --no-ablation            skip the no-gene2vec pretraining and scbert_nogene2vec (ablation.sh only)
#   -- ARGS                  passed on to python -m scripts.benchmark (protocol options such as --hold-out)
# Benchmarks run torch on one thread (python -m scripts.benchmark --threads); on a busy or 2-core machine also
# run the scripts with OMP_NUM_THREADS=1, or pretraining threads fight the other processes for the cores.
# Finished steps (genes.txt, prep_*.h5ad, pretrain_*/metrics.json) are reused when a script is run again.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python}"
# The accuracy benchmark: the module scripts.benchmark of this repository (not installed with the package),
# found from any working directory.
benchmark() { PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m scripts.benchmark "$@"; }
DATA=(); UNLABELLED=(); LABEL_KEY=celltype; OUT=""; PRETRAINED=""; PUBLISHED=0; N_GENES=""; VOCAB=""
SEEDS="0 1 2"; SCBERT_SEEDS="0"; FOLDS=5; MIN_GENES=200; METHODS=""; PRETRAIN_EPOCHS=10; ABLATION=1; EXTRA=(); PRETRAIN_ONCE=0

parse_args() {
    local list=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --data) list=data; shift ;;
            --unlabelled) list=unlabelled; shift ;;
            --label-key) LABEL_KEY=$2; list=""; shift 2 ;;
            --out) OUT=$2; list=""; shift 2 ;;
            --pretrained) PRETRAINED=$2; list=""; shift 2 ;;
            --pretrain-once) PRETRAIN_ONCE=1; list=""; shift ;;
            --published) PUBLISHED=1; list=""; shift ;;
            --n-genes) N_GENES=$2; list=""; shift 2 ;;
            --vocab) VOCAB=$2; list=""; shift 2 ;;
            --seeds) SEEDS=$2; list=""; shift 2 ;;
            --scbert-seeds) SCBERT_SEEDS=$2; list=""; shift 2 ;;
            --folds) FOLDS=$2; list=""; shift 2 ;;
            --min-genes) MIN_GENES=$2; list=""; shift 2 ;;
            --methods) METHODS=$2; list=""; shift 2 ;;
            --pretrain-epochs) PRETRAIN_EPOCHS=$2; list=""; shift 2 ;;
            --no-ablation) ABLATION=0; list=""; shift ;;
            --) shift; EXTRA=("$@"); break ;;
            -*) echo "error: unknown option $1 (see the header of scripts/paper/common.sh)" >&2; exit 2 ;;
            *) case "$list" in
                   data) DATA+=("$1") ;;
                   unlabelled) UNLABELLED+=("$1") ;;
                   *) echo "error: unexpected argument $1" >&2; exit 2 ;;
               esac; shift ;;
        esac
    done
    if [ ${#DATA[@]} -eq 0 ]; then echo "error: --data FILE is required" >&2; exit 2; fi
    if [ "$PUBLISHED" = 1 ]; then
        MODEL_ARGS=(--dim 200 --depth 6 --heads 10 --dim-head 64)
        PRETRAIN_ARGS=(--batch-size 3 --grad-acc 60 --lr 1e-4)
        PRESET=published; N_GENES=${N_GENES:-16906}
    else
        MODEL_ARGS=(--dim 32 --depth 2 --heads 4 --dim-head 8)
        PRETRAIN_ARGS=(--batch-size 16 --lr 1e-3)
        PRESET=cpu; N_GENES=${N_GENES:-2000}
    fi
    if [ -z "$METHODS" ]; then
        METHODS="logreg_l1 logreg_l2 knn_pca centroid_corr"
        if "$PY" -c "import celltypist" 2>/dev/null; then METHODS="$METHODS celltypist"; fi
    fi
    mkdir -p "$OUT"
}

# The gene vocabulary (written once), every input put on it, and the pretrained checkpoint(s).
prepare_and_pretrain() {
    local gene2vec_modes="train"
    if [ "${1:-}" = ablation ] && [ "$ABLATION" = 1 ]; then gene2vec_modes="train none"; fi
    PER_SPLIT=()
    if [ -n "$PRETRAINED" ]; then
        CKPT=$PRETRAINED; CKPT_NOG2V=""
        return
    fi
    local genes="$OUT/genes.txt"
    if [ ! -f "$genes" ]; then
        if [ -n "$VOCAB" ]; then
            benchmark --data "${DATA[@]}" --label-key "$LABEL_KEY" --vocab "$VOCAB" --min-genes "$MIN_GENES" --write-genes "$genes"
        else
            benchmark --data "${DATA[@]}" --label-key "$LABEL_KEY" --n-genes "$N_GENES" --min-genes "$MIN_GENES" --write-genes "$genes"
        fi
    fi
    local corpus=() unlabelled=() f i=0
    for f in "${UNLABELLED[@]}"; do
        i=$((i + 1))
        local prep="$OUT/prep_u${i}_$(basename "${f%.*}").h5ad"
        [ -f "$prep" ] || "$PY" "$REPO/preprocess.py" --data "$f" --vocab "$genes" --out "$prep" --min-genes "$MIN_GENES" --quiet
        unlabelled+=("$prep")
    done
    if [ "$PRETRAIN_ONCE" = 0 ]; then  # each run pretrains on the unlabelled cells plus its own training cells
        CKPT=""; CKPT_NOG2V=""; GENES_FILE=$genes
        PER_SPLIT=(--pretrain-per-split --vocab "$genes" --pretrain-epochs "$PRETRAIN_EPOCHS" --pretrain-batch-size "${PRETRAIN_ARGS[1]}" --pretrain-lr "${PRETRAIN_ARGS[-1]}")
        if [ ${#unlabelled[@]} -gt 0 ]; then PER_SPLIT+=(--pretrain-corpus "${unlabelled[@]}"); fi
        return
    fi
    i=0
    for f in "${DATA[@]}" "${UNLABELLED[@]}"; do
        i=$((i + 1))
        local prep="$OUT/prep_${i}_$(basename "${f%.*}").h5ad"
        [ -f "$prep" ] || "$PY" "$REPO/preprocess.py" --data "$f" --vocab "$genes" --out "$prep" --min-genes "$MIN_GENES" --quiet
        corpus+=("$prep")
    done
    local mode
    for mode in $gene2vec_modes; do
        local dir="$OUT/pretrain_gene2vec_$mode"
        [ -f "$dir/metrics.json" ] || "$PY" "$REPO/pretrain.py" --data "${corpus[@]}" --out "$dir" --gene2vec "$mode" \
            "${MODEL_ARGS[@]}" "${PRETRAIN_ARGS[@]}" --epochs "$PRETRAIN_EPOCHS" --seed 0 --quiet --overwrite
        cat "$dir/summary.txt"
    done
    CKPT="$OUT/pretrain_gene2vec_train/model.pt"
    CKPT_NOG2V=""
    if [ -f "$OUT/pretrain_gene2vec_none/model.pt" ] && [[ "$gene2vec_modes" == *none* ]]; then CKPT_NOG2V="$OUT/pretrain_gene2vec_none/model.pt"; fi
}

# run_protocol NAME "SCBERT_METHODS" BENCHMARK_ARGS...: baselines (all seeds) and scBERT (scBERT
# seeds) as two runs on the same splits, merged into $OUT/NAME.
run_protocol() {
    local name=$1 scbert_methods=$2; shift 2
    local encoder=("${PER_SPLIT[@]}")
    if [ -n "$CKPT" ]; then encoder=(--pretrained "$CKPT"); fi
    local common=(--data "${DATA[@]}" --label-key "$LABEL_KEY" "${encoder[@]}" --folds "$FOLDS" --min-genes "$MIN_GENES" --preset "$PRESET" --overwrite "$@" "${EXTRA[@]}")
    # shellcheck disable=SC2086
    benchmark "${common[@]}" --methods $METHODS --seeds $SEEDS --out "$OUT/${name}_baselines"
    local parts=("$OUT/${name}_baselines")
    if [ -n "$scbert_methods" ]; then
        local nog2v=()
        if [ -n "$CKPT_NOG2V" ]; then nog2v=(--pretrained-nogene2vec "$CKPT_NOG2V"); fi
        # shellcheck disable=SC2086
        benchmark "${common[@]}" "${nog2v[@]}" --methods $scbert_methods --seeds $SCBERT_SEEDS --out "$OUT/${name}_scbert"
        parts+=("$OUT/${name}_scbert")
    fi
    benchmark --merge "${parts[@]}" --out "$OUT/$name" --overwrite
    echo "results: $OUT/$name/results.md"
}
