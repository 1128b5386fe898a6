"""Suggest which unlabeled training images to label next (uncertainty of the mean teacher, spread by diversity).

    python -m stsc_tf.suggest --model_dir=runs/r0 --budget=200 --out=to_label.csv
    # fill the 'labels' column of to_label.csv, then:
    python -m stsc_tf.train --flagfile=configs/isic.flags --data_dir=... --model_dir=runs/r1 \
        --labeled_ids=runs/r0/labeled_ids.csv+to_label.csv --init_from=runs/r0

The score and its columns are described in stsc_tf/suggesting.py.
"""

from absl import app

from stsc_tf import cli, flags as flags_lib, suggesting


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        suggesting.suggest_run(**flags_lib.suggest_args())


if __name__ == "__main__":
    flags_lib.define_suggest_flags()
    app.run(main)
