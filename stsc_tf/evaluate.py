"""Evaluate a run's student and/or teacher on a split: prints the table, writes JSON and ROC curves (PNG).

    python -m stsc_tf.evaluate --model_dir=runs/isic --split=test --networks=both
    python -m stsc_tf.evaluate --model_dir=runs/isic --fit_thresholds [--threshold_criterion=f1] [--calibration=platt]

--fit_thresholds fits per-class thresholds and a calibration on the validation split (never the test split) and
stores them in <model_dir>/calibration.json, where predict and export find them.
"""

from absl import app

from stsc_tf import cli, evaluation, flags as flags_lib


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        evaluation.evaluate_run(**flags_lib.evaluate_args())


if __name__ == "__main__":
    flags_lib.define_evaluate_flags()
    app.run(main)
