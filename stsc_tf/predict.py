"""Predict new images with a trained run: one CSV row per image, streamed (constant memory), written atomically.

    python -m stsc_tf.predict --model_dir=runs/isic --images='new/**/*.jpg' --out=preds.csv
    python -m stsc_tf.predict --model_dir=runs/isic --image_list=files.txt --thresholds=validated
    python -m stsc_tf.predict --model_dir=runs/isic --data_dir=tfrecords/isic2018 --split=test

Columns: path, p_<class> for each class, the decision(s), entropy, disagreement (student vs teacher) and
uncertainty. --thresholds=validated uses the thresholds and calibration of `evaluate --fit_thresholds`. Files that
cannot be read are listed with the reason in <out>.skipped.csv and counted; none is silently left out.
"""

from absl import app

from stsc_tf import cli, evaluation, flags as flags_lib


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        evaluation.predict_run(**flags_lib.predict_args())


if __name__ == "__main__":
    flags_lib.define_predict_flags()
    app.run(main)
