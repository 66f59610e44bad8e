# The one place that says how to set up, lint, type-check, test and benchmark busagent.
PYTHON ?= python3

.PHONY: install lint type test pytest bench soak demo clean game-bench cli-docs

install:            ## install busagent and the development tools into the current Python
	$(PYTHON) -m pip install -q -e ".[dev]" --config-settings editable_mode=strict

lint:               ## ruff
	$(PYTHON) -m ruff check busagent tests examples benchmarks

type:               ## mypy --strict on the package and its mapped folders
	$(PYTHON) -m mypy

test: lint type     ## what CI runs: lint, types, then the whole test suite
	$(PYTHON) -m pytest -q

pytest:             ## only the test suite: real redis-server and worker processes, plus unit tests
	$(PYTHON) -m pytest -q

bench:              ## busagent vs the raw redis-py floor, side by side on one Redis
	$(PYTHON) benchmarks/bench.py

SOAK_ARGS ?=
soak:               ## 100,000 calls while killing workers and restarting Redis; audits every call
	$(PYTHON) benchmarks/soak.py --calls 100000 --kills 20 --redis-restarts 2 $(SOAK_ARGS)
# Redis misbehaving too: make soak SOAK_ARGS="--client-kills 10 --squeezes 3"

cli-docs:           ## regenerate cli/USAGE.md from the commands (a test checks it is current)
	typer busagent.cli utils docs --name busagent --output cli/USAGE.md

demo:
	busagent demo

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info

game-bench:         ## the guess-2/3 game at 100 / 1k / 10k / 100k / 1M agents, then the table
	for n in 100 1000 10000 100000; do $(PYTHON) examples/guess_two_thirds/main.py --agents $$n --shards $$(( n < 1000 ? 2 : n / 10000 + 2 )) --rounds 3 --sleep 0 --out benchmarks/results/game || exit 1; done
	$(PYTHON) examples/guess_two_thirds/main.py --agents 10000 --shards 4 --rounds 3 --sleep 1 --out benchmarks/results/game
	$(PYTHON) examples/guess_two_thirds/main.py --agents 1000000 --shards 50 --rounds 3 --sleep 0 --out benchmarks/results/game
	$(PYTHON) examples/guess_two_thirds/main.py --table benchmarks/results/game --plot
