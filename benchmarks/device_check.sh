#!/usr/bin/env bash
# The GPU checks, run on a lent CUDA machine (see README "GPU"): the CUDA tests, the
# expert-scaling benchmark on the GPU, and a CUDA-trained model pickled and saved for the
# CPU loading test. Needs skorch importable (wheels in .whl/ when the machine has no index).
# Results go to ${OUT:-benchmarks/results}.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, sklearn, skorch; print('torch', torch.__version__, 'sklearn', sklearn.__version__, 'skorch', skorch.__version__)"
python3 -m pytest tests/test_gpu.py tests/test_estimators.py -m gpu -q -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.log"
status=$?
python3 -m benchmarks.speed --part experts --device cuda --rounds 30 --out "$OUT" 2>&1 | tee "$OUT/gpu_speed.log"
python3 -m benchmarks.speed --part overhead --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/gpu_speed.log"
python3 - "$OUT" <<'PY'
import pickle, sys
import numpy as np
from sklearn_moe import MoERegressor
rng = np.random.RandomState(0)
X = rng.normal(size=(400, 5)); y = X[:, 0] + np.sin(2 * X[:, 1])
model = MoERegressor(n_experts=4, expert_hidden=(16,), max_epochs=20, device="cuda", random_state=0).fit(X, y)
with open(f"{sys.argv[1]}/cuda_model.pkl", "wb") as f:
    pickle.dump({"model": model, "X": X[:20], "pred": model.predict(X[:20])}, f)
model.save(f"{sys.argv[1]}/cuda_model.moe")
np.save(f"{sys.argv[1]}/cuda_model_pred.npy", model.predict(X[:20]))
print("pickled and saved (safe format) a CUDA-trained MoERegressor")
PY
exit $status
