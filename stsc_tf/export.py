"""Export a run's student or teacher as a SavedModel that TF Serving loads.

    python -m stsc_tf.export --model_dir=runs/isic --export_dir=export --name=stsc --version=1 [--model=teacher]

See stsc_tf/exporting.py for the signatures.
"""

from absl import app

from stsc_tf import cli, exporting, flags as flags_lib


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        path = exporting.export_run(**flags_lib.export_args())
        print(f"exported to {path}\n  saved_model_cli show --dir {path} --all")


if __name__ == "__main__":
    flags_lib.define_export_flags()
    app.run(main)
