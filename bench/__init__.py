"""cdfast benchmarks.

* ``python -m bench.run [--quick] [--device cpu|cuda] [--out bench/results]``: every
  case, one CSV row per (case, implementation, device), plus the scaling plots.
* ``python -m bench.report``: ``bench/RESULTS.md`` from that CSV.
* ``python -m pytest bench --benchmark-enable``: the same cases (smallest sizes) as
  pytest-benchmark benchmarks.

The reference implementation is ``tests/authors_reference.py`` (the authors'
per-layer procedure, eager or with ``torch.compile``); it is imported from the
repository's ``tests`` folder, never copied.
"""
