"""Summarises run directories: a markdown table, and plots when matplotlib is installed; or
compares two systems evaluated on the same images.

  python experiments/report.py runs/psp runs/unet --out=runs/report.md
  python experiments/report.py 'runs/ablate_loss/*/seed*' --out=runs/ablate_loss/report.md
  python experiments/report.py --compare runs/psp_a runs/psp_b
  python experiments/report.py --compare 'runs/abl/baseline/seed*' 'runs/abl/bins_1/seed*'

--compare takes two arguments, A then B (each a run directory or a glob of its seeds), and
prints B - A in mIoU and pixel accuracy on --split with a 95% paired-bootstrap interval over
images and seeds, and the fraction of resamples in which the sign flips (seg/compare.py).

Arguments are run directories or glob patterns (quoted, or expanded by the shell). The table
has one row per run: model, parameters, steps, wall time, train images/s, the last val eval's
mIoU, pixel accuracy and per-class IoU, and the test mIoU; seg/report.py says what is drawn.
"""
from absl import app, flags

from seg import cli, report

_OUT = flags.DEFINE_string("out", "report.md", "Markdown file to write; plots go next to it.")
_PLOTS = flags.DEFINE_bool("plots", True, "Draw the plots (needs matplotlib).")
_COMPARE = flags.DEFINE_bool("compare", False, "Compare B (second argument) against A (first).")
_SPLIT = flags.DEFINE_enum("split", "val", ["val", "test"], "--compare: the split compared.")
_RESAMPLES = flags.DEFINE_integer("resamples", 10_000, "--compare: bootstrap resamples.")


def main(argv):
    if _COMPARE.value:
        if len(argv) != 3:
            raise app.UsageError("usage: report.py --compare <runs A> <runs B>")
        print(report.comparison([argv[1]], [argv[2]], _SPLIT.value, _RESAMPLES.value))
        return
    if len(argv) < 2:
        raise app.UsageError("usage: report.py <run dir or glob>... [--out=report.md]")
    text, done = report.write_report(argv[1:], _OUT.value, _PLOTS.value)
    print(text + "\n".join(done))


if __name__ == "__main__":
    cli.run(main)
