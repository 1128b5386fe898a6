"""Evaluate a run's student and/or teacher on a split: prints the table, writes JSON and ROC curves (PNG).

    python -m stsc_tf.evaluate --model_dir=runs/isic --split=test --networks=both
"""

from absl import app

from stsc_tf import cli, flags as flags_lib


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        args = flags_lib.evaluate_args()
        from stsc_tf import evaluation

        evaluation.evaluate_run(**args)


if __name__ == "__main__":
    flags_lib.define_evaluate_flags()
    app.run(main)
