.PHONY: test lint bench gpu
test:
	pytest
lint:
	ruff check .
	ruff format --check .
bench:
	python benchmarks/trainer_overhead.py
	python benchmarks/kernels_metrics.py
	python benchmarks/kernels_loss.py
	python benchmarks/lm_memory.py
	python benchmarks/sweep.py
gpu:
	bash scripts/gpu_check.sh
