"""Seeded fuzz of the command line: a few hundred malformed inputs over eleven families (see fuzz_inputs.py).

Each family's cases come from a fixed seed and all run; the test then asserts that every case is "exit 2 clean"
(one ``surgery: error:`` line naming the input, no traceback, nothing left behind) or "exit 0 complete" (on an
input that may in fact be valid, with a complete output), and lists the others compactly (case id, command,
mutation, exit code, verdict, error line). Each family's table row is printed (``-s``) and its results saved in
pytest's base temporary directory as fuzz/<family>.json, from which the whole table and the failure kinds print::

    pytest tests/test_fuzz.py --basetemp=/tmp/fuzz-run      # a fixed basetemp outlives other pytest runs
    python tests/fuzz_inputs.py --table --from /tmp/fuzz-run/fuzz
"""

from __future__ import annotations

import pytest

from fuzz_inputs import FAMILIES, build_sources, failures, format_table, run_family, save_results, table_row, warm_up


@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory, tiny_checkpoints, sharded_llama):
    root = tmp_path_factory.mktemp("fuzz-sources")
    sources = build_sources(root, llama=tiny_checkpoints["llama"], sharded=sharded_llama)
    warm_up(sources, root / "warm-up")
    return sources


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz(family, fuzz_sources, tmp_path, tmp_path_factory):
    results = run_family(family, fuzz_sources, tmp_path)
    save_results(tmp_path_factory.getbasetemp() / "fuzz" / f"{family}.json", family, results)
    table = format_table([table_row(family, results)])
    print(f"\n{table}")
    failed = failures(results)
    assert not failed, (f"{len(failed)} of {len(results)} {family} cases break the bad-input contract:\n"
                        + "\n".join(failed) + f"\n{table}")
