# Two entry points (see README): `make demo` and `make test`. Each makes its own virtual
# environment in .venv on first use and reinstalls when pyproject.toml changes, or the loader's
# compiled read loop (setup.py, shards/_fastread.c: the editable install builds it in place).
PYTHON ?= python3
# torch is installed first, pinned, so that the extras keep that build. From an ordinary package
# index a plain `torch==2.13.0` is the CUDA build (several GB of CUDA libraries); for the CPU
# build name its index: `make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu`. Left
# empty, pip's own configuration decides (this project's CI finds a local CPU wheel there).
TORCH_INDEX_URL ?=
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo-out
DEMO_N ?= 200

.PHONY: demo test venv clean-demo gpu-check

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py shards/_fastread.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e '.[train,viz,dev]'
	touch $@

# The demo trains in float32 (--amp none): on a CPU without bf16 instructions (avx512_bf16,
# amx_bf16) bf16 autocast is emulated, 6.2 s a step against 0.47 s on a 2-core AMD EPYC VM.
demo: venv
	$(PY) -m ingest.synth --out $(DEMO)/rsna --n $(DEMO_N) --seed 0
	$(PY) -m ingest --dicom-dir $(DEMO)/rsna/images --labels $(DEMO)/rsna/stage_2_train_labels.csv \
	    --class-info $(DEMO)/rsna/stage_2_detailed_class_info.csv --out $(DEMO)/dataset --shard-size 32
	$(PY) -m shards verify $(DEMO)/dataset --deep --source $(DEMO)/rsna/images \
	    --labels $(DEMO)/rsna/stage_2_train_labels.csv
	$(PY) -m shards stats $(DEMO)/dataset --png $(DEMO)/stats.png
	$(PY) -m train --data $(DEMO)/dataset --task classify --out $(DEMO)/run-classify \
	    --image-size 128 --epochs 6 --batch-size 16 --lr 2e-3 --amp none
	$(PY) -m train.report $(DEMO)/run-classify -o $(DEMO)/run-classify/curves.png
	@echo "demo done: dataset in $(DEMO)/dataset, training run in $(DEMO)/run-classify"

test: venv
	$(PY) -m pytest

clean-demo:
	rm -rf $(DEMO)

# On a machine with one (or more) NVIDIA GPUs (its duration is not measured yet: no GPU has run
# it): the CUDA code paths (tests marked gpu: bf16/fp16, NCCL, SyncBatchNorm, pinned copies,
# FSDP2, a 640 px detector step, short training runs), then the training bench at 640 px.
# The venv needs the CUDA build of torch: on a fresh checkout `make gpu-check` from an ordinary
# index gets it, or name the one the driver supports: TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXXX.
gpu-check: venv
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device visible')"
	$(PY) -m pytest -m gpu -p no:cacheprovider tests/test_gpu.py -v
	$(PY) -m train.bench --size 640
