"""Exports a trained run: a weights-only state_dict for the plain nn.Module, a torch.export
program and, when the optional onnx packages are installed, an ONNX model; each is checked
against the run's own forward before it is written.

  python experiments/export.py --workdir=runs/psp                      # -> runs/psp/export/
  python experiments/export.py --workdir=runs/psp --checkpoint=best --out=exported/psp
  python experiments/export.py --workdir=runs/psp --formats=weights

Without --formats, a missing onnx package is a note and the other files are written; asking
for onnx explicitly makes it an error (exit status 1, the other files still written).
"""
from absl import app, flags

from configs import common
from seg import cli, export

_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run's directory.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/export).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "last", "last: the newest readable checkpoint; "
                                  "best: the weights of the best val eval; or a file.")
_FORMATS = flags.DEFINE_list("formats", list(export.FORMATS), "Any of weights, program, onnx.")
_SIZE = flags.DEFINE_list("size", None, "H,W of the example input (default: the run's crop or "
                          "image size).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    export.export_run(_WORKDIR.value, _OUT.value, _CHECKPOINT.value, tuple(_FORMATS.value),
                      _SIZE.value, onnx_required=flags.FLAGS["formats"].present,
                      defaults=common.get_base_config())


if __name__ == "__main__":
    cli.run(main)
