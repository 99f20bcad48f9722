# The two commands of the README. Each installs what it needs into .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench
# mcalc itself (what the demo needs), then the test extra on top (PyTorch's CPU build among it)
$(VENV)/base: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/installed: $(VENV)/base
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/base
	$(VENV)/bin/mcalc demo

test: $(VENV)/installed
	$(VENV)/bin/ruff check mcalc tests examples benchmarks
	$(VENV)/bin/pytest -q -p no:cacheprovider

# Benchmarks side by side with BackPACK 1.7.1. Installed without its dependencies on purpose:
# it declares torchvision, which HBP does not use and which would pull a multi-GB CUDA torch.
bench: $(VENV)/installed
	$(PY) -m pip install -q --no-deps backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 einops
	$(PY) benchmarks/derive.py --json benchmarks/results/derive.json
	$(PY) benchmarks/hbp_pass.py --json benchmarks/results/hbp_pass_cpu.json
	$(PY) benchmarks/hbp_pass.py --count-launches --json benchmarks/results/launch_counts.json
	$(PY) benchmarks/solve_costs.py --json benchmarks/results/solve_costs_cpu.json
	$(PY) benchmarks/robustness.py --seeds 3 --epochs 8 --json benchmarks/results/robustness.json --plot benchmarks/results/robustness.png
	$(PY) benchmarks/time_to_accuracy.py --json benchmarks/results/time_to_accuracy.json --plot benchmarks/results/time_to_accuracy.png
