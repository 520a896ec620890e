"""The fault suite: what a client sees when things go wrong under load, on real processes.

Run by `make test` with the rest (pytest collects tests/reliability/), and alone with

    .venv/bin/python -m pytest tests/reliability

Every test starts `kiln serve` (tests._server.serve_process) with one real worker process on the
tiny random-weight SD1 package of tests/conftest.py, and uses client timeouts, so a hang is a
failure, not a stuck run. About two minutes on two cores, most of it the soak:

  test_worker_killed.py   kill -9 of the worker mid-batch, requests in flight: each gets a 200 or
                          an OpenAI-error 503, the worker is restarted and 200s resume
  test_drain.py           SIGTERM with a long Images API request in flight: it completes, newcomers
                          get 503 + Retry-After, the process exits 0
  test_fault.py           a fault-injected request (KILN_FAULT_PROMPT) is one 500; its batch-mates
                          get 200s
  test_hostile_inputs.py  a 4301-digit size, JSON nested 1000 deep, a %0a URL path and an oversized
                          negative_prompt, sent together with normal requests: each a 4xx OpenAI
                          error, the normal ones 200, nothing a 5xx
  test_soak.py            60 s at concurrency 8 of mixed chat, n=2, streaming, Images API and edits
                          (benchmarks/soak.py's load): nothing lost, every status 200 or retryable,
                          /metrics counts what the clients counted

The single-case versions of these live next to the code they test (test_worker_supervision.py,
test_server_shutdown.py, test_worker_faults.py, test_server_errors.py); this folder is the same
failures under concurrent load through the whole front end. The long soak (10 minutes at
concurrency 16 on the bundled model, with RSS growth) is `make soak` (benchmarks/soak.py).
"""
