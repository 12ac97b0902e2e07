#!/bin/bash
# device-machine run (not part of the product): people step times + GPU tests
cd "$(dirname "$0")"
pip install --no-deps --no-index -q .whl/diffusers-0.42.1-py3-none-any.whl 2>&1 | tail -2
mkdir -p /tmp/pkg/caphuman && for d in export engines kernels runtime tritonserver; do ln -sfn "$PWD/$d" /tmp/pkg/caphuman/$d; done
export PYTHONPATH=/tmp/pkg:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python -c "import caphuman.engines.factory, diffusers, transformers, triton, torch; print('imports ok', torch.__version__, triton.__version__, diffusers.__version__, transformers.__version__)"
case "$1" in
people)
  timeout 200 python -m pytest -q -p no:cacheprovider tests/engines/test_engines_torch.py -k "several_people or cuda_graph_engine_matches_eager" 2>&1 | tail -6 | tee $OUT/gpu_tests_people.txt
  timeout 360 python bench/bench_e2e.py --parts people --people-modes optimized,optimized_compiled --repeat 30 --out $OUT 2>&1 | tail -25
  ;;
tests)
  timeout 560 python -m pytest -q -p no:cacheprovider tests/engines tests/kernels -x 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
  ;;
esac
ls $OUT
