"""The fault suite: the real binaries under load while things break.

Each scenario starts ``trismtp serve`` (and, for most, a separate ``trismtp
jobs serve``), drives it with ≥ 8 SMTP clients from this process
(:mod:`.load`), injects one fault (SIGKILL, SIGTERM, SIGSTOP, a dropped ack
through :mod:`.proxy`, a file that cannot grow) and then checks the promise
against the SQLite file: every ``250 … queued as <id>`` is stored exactly
once (:mod:`.harness`).

    .venv/bin/pytest tests/faults                       # part of `make test`
    TRISMTP_FAULT_REPORT=faults.jsonl .venv/bin/pytest tests/faults
    python -m tests.faults.report faults.jsonl          # the markdown table
    TRISMTP_SLOW=1 .venv/bin/pytest tests/faults -k 1000 -s   # peak RSS figure
"""
