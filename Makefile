# The two commands of the README. Each installs what it needs into .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench gpu-wheels
# mcalc itself (what the demo needs), then the test extra on top (PyTorch's CPU build among it)
$(VENV)/base: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# The peers the tests and benchmarks run side by side (BackPACK 1.7.1, curvlinops 3.0.1), installed
# without their dependencies on purpose: BackPACK declares torchvision, which they do not use and which
# would pull a multi-GB CUDA torch; what they do import is listed beside them.
PEERS := backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 unfoldNd==0.2.3 einops==0.8.2 \
	einconv==0.1.0 linear_operator==0.6.1 jaxtyping==0.3.11 wadler_lindig==0.1.8 opt_einsum==3.4.0 tqdm==4.70.1

$(VENV)/installed: $(VENV)/base
	$(PY) -m pip install -q -e ".[test,mpi]"
	$(PY) -m pip install -q --no-deps $(PEERS)
	touch $@

demo: $(VENV)/base
	$(VENV)/bin/mcalc demo

test: $(VENV)/installed
	$(VENV)/bin/ruff check mcalc tests examples benchmarks
	$(VENV)/bin/pytest -q -p no:cacheprovider

# What a lent GPU machine's image lacks for benchmarks/gpu_session.sh (it reaches no registry; einops, opt_einsum
# and the others of PEERS are in the image already): as wheels in .whl/, built here, carried by the device tool
GPU_WHEELS := backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 unfoldNd==0.2.3 einconv==0.1.0 mnist1d==0.0.2.post1

gpu-wheels: $(VENV)/base
	rm -rf .whl
	$(PY) -m pip wheel -q --no-deps -w .whl $(GPU_WHEELS)

# Benchmarks side by side with the peers above
bench: $(VENV)/installed
	$(PY) benchmarks/derive.py --json benchmarks/results/derive.json
	$(PY) benchmarks/hbp_pass.py --json benchmarks/results/hbp_pass_cpu.json
	$(PY) benchmarks/hbp_pass.py --count-launches --json benchmarks/results/launch_counts.json
	$(PY) benchmarks/solve_costs.py --json benchmarks/results/solve_costs_cpu.json
	$(PY) benchmarks/robustness.py --seeds 3 --epochs 8 --json benchmarks/results/robustness.json --plot benchmarks/results/robustness.png
	$(PY) benchmarks/time_to_accuracy.py --json benchmarks/results/time_to_accuracy.json --plot benchmarks/results/time_to_accuracy.png
