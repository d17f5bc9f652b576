#!/usr/bin/env bash
# The GPU checks, run on a lent CUDA machine (see README "GPU"), as one script:
# 1. the CUDA tests: tests/test_gpu.py (among them training steps of the module and of the
#    estimator run under torch.cuda.set_sync_debug_mode("error") and a step captured in a
#    CUDA graph, both of which fail on any host synchronisation, and the grouped-matmul
#    layout against the padded one) and the estimators' CUDA tests (multilabel included);
# 2. the expert-scaling benchmark on the GPU, a training step at batch 1024 for 2 to 128
#    experts, in float32 and under bf16 autocast, each also replayed from a CUDA graph: its
#    "criterion" gives the step time at 2 experts and the ratio at 64. It writes
#    speed_experts_cuda.json and speed_experts_bf16_cuda.json, which name the device;
# 3. training throughput on 1M rows, 64 experts top-2 against a dense MLP of equal active
#    parameters, eager and replayed from CUDA graphs (throughput_cuda.json,
#    throughput_graph_cuda.json, throughput_bf16_graph_cuda.json);
# 4. the estimator's overhead over a plain loop on the GPU;
# 5. where the step's time goes at 2 and 64 experts, kernel by kernel (kernel_profile_cuda.json,
#    kernel_profile_bf16_cuda.json);
# 6. a CUDA-trained model pickled and saved for the CPU loading test.
# Needs skorch importable (wheels in .whl/ when the machine has no index). Results go to
# ${OUT:-benchmarks/results}; about 7 minutes on one H200.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
python3 -c "import torch, sklearn, skorch; print('torch', torch.__version__, 'sklearn', sklearn.__version__, 'skorch', skorch.__version__)"
# Every failure listed (no -x): a device session is too short to rerun for the next one.
python3 -m pytest tests/test_gpu.py tests/test_estimators.py tests/test_multilabel.py -m gpu -q -p no:cacheprovider -rf --durations=10 \
    2>&1 | tee "$OUT/gpu_tests.log"
status=$?
for precision in float32 bf16; do
    python3 -m benchmarks.speed --part experts --device cuda --precision $precision --graph --rounds 30 --out "$OUT" \
        2>&1 | tee -a "$OUT/gpu_speed.log"
done
for flags in "" "--graph" "--precision bf16 --graph"; do
    python3 -m benchmarks.throughput --device cuda $flags --out "$OUT" 2>&1 | tee -a "$OUT/gpu_speed.log"
done
python3 -m benchmarks.speed --part overhead --device cuda --out "$OUT" 2>&1 | tee -a "$OUT/gpu_speed.log"
for precision in float32 bf16; do
    python3 -m benchmarks.kernel_profile --device cuda --precision $precision --out "$OUT" 2>&1 | tee -a "$OUT/gpu_speed.log"
done
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
