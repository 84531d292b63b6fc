"""The README's Results section is what tools/readme_results.py makes of bench/results/ (no hand-copied numbers)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_results_section_is_generated_from_the_result_files():
    proc = subprocess.run([sys.executable, "tools/readme_results.py", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_section_names_each_source_file():
    sys.path.insert(0, str(REPO / "tools"))
    import readme_results

    text = readme_results.section()
    for name in ("optimizer_step.json", "memory_per_param.json", "cpu_small_gpt.json", "data_index.json"):
        if (readme_results.RESULTS / name).is_file():
            assert f"bench/results/{name}" in text
