"""The README's quick-start test command is what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_line = [l for l in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in l]
    assert len(ci_line) == 1
    readme_lines = (ROOT / "README.md").read_text().splitlines()
    assert ci_line[0] in readme_lines


def test_readme_main_command_uses_the_pspnet_config():
    text = (ROOT / "README.md").read_text()
    assert "pip install -r requirements.txt && python experiments/train.py " \
           "--config=configs/pspnet.py --workdir=" in text
