"""Summarises run directories: a markdown table, and plots when matplotlib is installed.

  python experiments/report.py runs/psp runs/unet --out=runs/report.md
  python experiments/report.py 'runs/ablate_loss/*/seed*' --out=runs/ablate_loss/report.md

Arguments are run directories or glob patterns (quoted, or expanded by the shell). The table
has one row per run: model, parameters, steps, wall time, train images/s, the last val eval's
mIoU, pixel accuracy and per-class IoU, and the test mIoU; seg/report.py says what is drawn.
"""
from absl import app, flags

from seg import cli, report

_OUT = flags.DEFINE_string("out", "report.md", "Markdown file to write; plots go next to it.")
_PLOTS = flags.DEFINE_bool("plots", True, "Draw the plots (needs matplotlib).")


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("usage: report.py <run dir or glob>... [--out=report.md]")
    text, done = report.write_report(argv[1:], _OUT.value, _PLOTS.value)
    print(text + "\n".join(done))


if __name__ == "__main__":
    cli.run(main)
