# Sourced by the three job scripts: strict mode, the environment (env.sh) and the model folder of the run.
set -euo pipefail
: "${RECIPE_DIR:?submit the jobs with submit.sh, which sets RECIPE_DIR and the variables of the run}"
source "$RECIPE_DIR/env.sh"

# nnU-Net's model folder: $nnUNet_results/DatasetXXX_NAME/TRAINER__PLANS__CONFIGURATION
model_folder() {
  python - "$DATASET" "$TRAINER" "$PLANS" "$CONFIGURATION" <<'PY'
import sys
from nnunetv2.utilities.file_path_utilities import get_output_folder
print(get_output_folder(*sys.argv[1:]))
PY
}

echo "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) on $(hostname) at $(date '+%F %T')"
echo "dataset $DATASET, trainer $TRAINER, plans $PLANS, configuration $CONFIGURATION"
