"""Every Python example of the seed's README (tests/data/seed-README.md, the original package's), run
unchanged in a fresh interpreter against the loopback mock: only the install line differs. A fragment
that leans on an earlier example (no import, or no `jongler` of its own) gets that context first, as a
reader of the README would have it."""

from __future__ import annotations

import pathlib
import re

import pytest

from conftest import DEADLINE

README = pathlib.Path(__file__).parent / "data" / "seed-README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def with_context(code: str) -> str:
    prelude = ""
    if "from api_jongler import" not in code:
        prelude += "from api_jongler import APIJongler\n"
    if "jongler = " not in code:
        prelude += 'jongler = APIJongler("generativelanguage.googleapis.com")\n'
    return prelude + code


def test_the_readme_has_its_examples():
    assert len(EXAMPLES) >= 8, "the seed README's Python examples were not found"


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example{n}" for n in range(len(EXAMPLES))])
def test_seed_example_runs_unchanged(sandbox, code):
    process = sandbox.python(with_context(code))
    out, err = process.communicate(timeout=DEADLINE)
    assert process.returncode == 0, f"example failed:\n{code}\n--- stdout\n{out}\n--- stderr\n{err}"
    for secret in sandbox.all_secrets():
        assert secret not in out and secret not in err
