# trismtp: the two commands of the quick start are `make run` and `make test`.
# Only python3 and make are assumed; everything else goes into .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest install lock clean bench faults

run: $(STAMP)  ## install if needed, then run the daemon with the embedded jobs service
	$(BIN)/trismtp serve

test: lint typecheck pytest  ## the whole suite: ruff, ruff format, mypy --strict, pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict

pytest: $(STAMP)
	$(BIN)/pytest

install: $(STAMP)

# The fault suite alone (it also runs in `make test`), with its figures as a
# markdown table (docs/guarantees.md). TRISMTP_SLOW=1 adds the 1,000 x 1 MB run.
faults: $(STAMP)  ## fault-injection scenarios and their figures
	rm -f .faults.jsonl
	TRISMTP_FAULT_REPORT=.faults.jsonl $(BIN)/pytest tests/faults -q
	$(BIN)/python -m tests.faults.report .faults.jsonl

# The benchmark (bench/README.md): trismtp vs aiosmtpd and Postfix's smtp-sink.
# Scale down with e.g. `BENCH_MESSAGES=2000 BENCH_IDLE=2000 BENCH_MIX_SECONDS=20 make bench`;
# more options: `make bench BENCH_ARGS=--help`.
bench: $(STAMP)  ## throughput, latency and idle-connection benchmark into bench/results/
	@for tool in smtp-source smtp-sink; do \
		PATH="$$PATH:/usr/sbin:/sbin" command -v $$tool >/dev/null || { \
			echo "make bench: Postfix's $$tool not found (/usr/sbin/$$tool)." >&2; \
			echo "  Install it with: apt-get install postfix (see .ci/run for an install" >&2; \
			echo "  that does not start a mail server)." >&2; exit 1; }; \
	done
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The fuzz campaign: tests/fuzz (a hypothesis state machine of the SMTP
# dialogue, byte-stream fuzzing of the protocol and of the message parser)
# with a budget of FUZZ_EXAMPLES examples per unit of weight instead of the
# 800 of `make test` (tests/fuzz/support.py): about 9 minutes on 2 cores.
FUZZ_EXAMPLES ?= 20000

.PHONY: fuzz
fuzz: $(STAMP)  ## long fuzz campaign of the SMTP protocol and the message parser
	TRISMTP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/fuzz -q --hypothesis-show-statistics

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

lock: $(STAMP)  ## re-pin requirements.lock from what is installed
	$(BIN)/python -m pip freeze --exclude-editable > requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
