"""Which transformers versions apply which PEFT export layout, as measured.

PEFT loads tensors that match no module with at most a warning, so an export
that the loading transformers cannot apply would load and change nothing. An
export therefore names the transformers version it is for (``--for-transformers``,
by default the one installed here, if any), and a layout that version does not
apply is refused before anything is written.

What was measured (tests/test_export.py loads the exports of every exported
family in each environment that ``.ci/run`` builds, and checks that the
combinations refused here really are not applied):

- fused (PEFT ``target_parameters`` on the experts' fused parameters): the
  fused experts of transformers 5. Tested: transformers 5.25 with PEFT 0.22.0,
  5.24 with PEFT 0.21.2. transformers 4 keeps most families' experts as one
  module each, which this layout does not target.
- per-expert (one LoRA module per expert, transformers 4's names): transformers
  4.x (tested: 4.57 with PEFT 0.21.2), and transformers 5 before 5.25 through
  PEFT's conversion to the fused experts (tested: 5.24). From transformers 5.25
  on, PEFT (0.21.2, 0.22.0) no longer converts such a file: it loads with
  "unexpected adapter keys" and leaves the experts untouched, or targets nothing.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from ..errors import InputError

# The last transformers release that applies a per-expert export (through PEFT's conversion).
PER_EXPERT_LAST_APPLIED = (5, 24)


class ExportError(InputError):
    """An adapter that cannot be expressed in the requested PEFT layout; the message says why."""


# What each layout is for, and the versions it was tested with.
WRITTEN_FOR = {
    "fused": "transformers >= 5 (tested: 5.25 with PEFT 0.22.0, 5.24 with PEFT 0.21.2)",
    "per-expert": "transformers 4.x and transformers 5 before 5.25 (tested: 4.57 and 5.24 with PEFT 0.21.2)",
}


def installed(package: str) -> str | None:
    """The installed version of ``package``, or None (read from its metadata: nothing is imported)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def major_minor(release: str) -> tuple[int, int]:
    """(4, 57) for '4.57.6' or '4.57'; a version that does not start with two numbers is refused."""
    found = re.match(r"^\s*(\d+)\.(\d+)", str(release))
    if not found:
        raise ExportError(f"--for-transformers takes a transformers version such as 4.57 or 5.25, got {release!r}")
    return int(found[1]), int(found[2])


def refusal(layout: str, transformers: str) -> str:
    """Why an export in ``layout`` would not be applied by ``transformers`` ("" when it is)."""
    release = major_minor(transformers)
    if layout == "fused" and release < (5, 0):
        return (f"transformers {transformers} keeps MoE experts as one module each, which a fused export does not "
                "target; use --layout per-expert for transformers 4.x")
    if layout == "per-expert" and release > PER_EXPERT_LAST_APPLIED:
        return (f"transformers {transformers} loads a per-expert export without applying it (PEFT's conversion to "
                "its fused experts leaves the expert tensors unused); use --layout fused, or --for-transformers 4.57 "
                "for a file to load on transformers 4.x")
    return ""
