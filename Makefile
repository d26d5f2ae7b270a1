.PHONY: test lint bench
test:
	pytest
lint:
	ruff check .
	ruff format --check .
bench:
	python benchmarks/trainer_overhead.py
