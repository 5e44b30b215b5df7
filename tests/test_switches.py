"""README's "Switches" section against the code: every PYSSM_ environment variable the library
(pyssm/, csrc/) reads is documented there, and every one its table lists is read."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
READS = re.compile(r'(?:environ\.get\(|environ\[|getenv\()\s*"(PYSSM_[A-Z0-9_]+)"')


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Switches\n")
    return text[start:text.index("\n## ", start + 1)]


def _read_by_the_library() -> set[str]:
    files = [*ROOT.joinpath("pyssm").rglob("*.py"), *ROOT.joinpath("csrc").rglob("*.cpp"),
             *ROOT.joinpath("csrc").rglob("*.cuh"), *ROOT.joinpath("csrc").rglob("*.h")]
    return {name for f in files for name in READS.findall(f.read_text())}


def test_every_variable_the_library_reads_is_documented():
    section = _section()
    read = _read_by_the_library()
    assert {"PYSSM_BACKEND", "PYSSM_SS2D_BWD", "PYSSM_NORM_MLP"} <= read  # (the scan finds them)
    missing = sorted(name for name in read if f"`{name}`" not in section)
    assert not missing, f"README's Switches section does not name {missing}"


def test_every_switch_in_the_table_is_read():
    table = re.findall(r"^\| `(PYSSM_[A-Z0-9_]+)` \|", _section(), flags=re.M)
    assert len(table) >= 19
    stale = sorted(set(table) - _read_by_the_library())
    assert not stale, f"README's Switches table lists {stale}, which nothing reads"
