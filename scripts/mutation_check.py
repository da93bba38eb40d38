"""Do the method's tests fail when the method breaks? Seven mutations, one at a time.

Each mutation changes one line of the method in a copy of the package (the
working tree is left alone) and runs the method's tests against that copy; a
mutation is *killed* when at least one test fails.

    python scripts/mutation_check.py            # all seven, the method's test files
    python scripts/mutation_check.py --tests tests/test_growth.py

(a) the importance EMAs of a module that grew are not reset;
(b) the importance EMA keeps only the last step's score, g <- (1 - beta) s (its beta term dropped);
(c) the saliency used for growth has no rank penalty (gamma = 0);
(d) the routing frequency is tiled onto the wrong modules (expert e's f goes to other experts' modules);
(e) the pooled layout's importance EMA keeps only the last step's score;
(f) the pooled layout's gradient goes to the neighbouring slot (its inverse table shifted by one);
(g) a grown rank starts with a random B as well as a random A (growth no longer function-preserving).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_training_step.py", "tests/test_schedule.py", "tests/test_routing.py", "tests/test_families.py",
         "tests/test_masked_lora.py", "tests/test_pooled_lora.py", "tests/test_growth.py"]
MUTATIONS = {
    "a: importance not reset after growth": (
        "drlora_mlx/method/growth.py", "        reset_importance(drlora, grown > 0)\n", "        pass\n"),
    "b: importance EMA replaced by the last value": (
        "drlora_mlx/method/importance.py", "module.importance = beta * module.importance + (1.0 - beta) * scores",
        "module.importance = (1.0 - beta) * scores"),
    "c: gamma = 0 in the growth saliency": (
        "drlora_mlx/method/growth.py", "scores = saliency(f, g, ranks, config.rank_penalty, config.saliency)",
        "scores = saliency(f, g, ranks, 0.0, config.saliency)"),
    "d: frequency tiled onto the wrong modules": (
        "drlora_mlx/method/growth.py", "np.tile(np.asarray(drlora.routing.frequency), (1, len(drlora.targets)))",
        "np.repeat(np.asarray(drlora.routing.frequency), len(drlora.targets), axis=1)"),
    "e: pooled importance EMA replaced by the last value": (
        "drlora_mlx/lora/pooled.py", "self.importance = beta * self.importance + (1.0 - beta) * scores",
        "self.importance = (1.0 - beta) * scores"),
    "f: pooled gradient in the neighbouring slot": (
        "drlora_mlx/lora/pooled.py", "inverse.at[table.reshape(-1)].minimum(mx.arange(n, dtype=mx.int32))",
        "inverse.at[table.reshape(-1)].minimum((mx.arange(n, dtype=mx.int32) + 1) % n)"),
    "g: grown ranks start with a random B": (
        "drlora_mlx/lora/pooled.py", "self.write(module.b_side, slots, 0.0)",
        "self.write(module.b_side, slots, mx.random.uniform(shape=(len(slots), self.side_dims(module.b_side))))"),
}


def run_tests(package_root: Path, tests: list[str]) -> bool:
    """Whether every test passes with the package found first at ``package_root``."""
    env = dict(os.environ, PYTHONPATH=str(package_root))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=package_root, env=env, capture_output=True, text=True)
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", nargs="*", default=TESTS, help="Test files to run against each mutation.")
    args = parser.parse_args()
    killed = 0
    with tempfile.TemporaryDirectory(prefix="drlora-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv*", "__pycache__", "adapters"))
        if not run_tests(copy, args.tests):
            sys.exit("the tests fail without any mutation; fix them first")
        for name, (file, old, new) in MUTATIONS.items():
            path = copy / file
            original = path.read_text()
            if original.count(old) != 1:
                sys.exit(f"mutation {name!r}: its line is not in {file} exactly once; update this script")
            path.write_text(original.replace(old, new))
            survived = run_tests(copy, args.tests)
            path.write_text(original)
            killed += not survived
            print(f"{'survived' if survived else 'killed  '}  {name}", flush=True)
    print(f"{killed} of {len(MUTATIONS)} mutations killed by {', '.join(args.tests)}")
    sys.exit(0 if killed == len(MUTATIONS) else 1)


if __name__ == "__main__":
    main()
