"""The end-to-end benchmark files each GPU kernel of ours under the right category (read from
the kernel sources, so no GPU or Triton is needed): a kernel filed as "other" hides its time."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from kernel_categories import category  # noqa: E402

KERNELS = ROOT / "quantvla_fx" / "kernels"
EXPECTED = {"attention": "attention", "triton": "w4a8", "w4a16": "w4a8"}  # folder -> category


def launched_kernels(folder: Path) -> list[str]:
    """Names of the @triton.jit functions a host function launches (``name[grid](...)``)."""
    src = "\n".join(f.read_text() for f in folder.glob("*.py"))
    jitted = re.findall(r"@triton\.jit(?:\([^)]*\))?[^\n]*\ndef (\w+)", src)  # a comment may follow
    return [n for n in jitted if re.search(rf"\b{n}\[", src)]


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_our_kernels_land_in_their_category(folder):
    names = launched_kernels(KERNELS / folder)
    assert names, folder
    assert {n: category(n) for n in names} == {n: EXPECTED[folder] for n in names}
