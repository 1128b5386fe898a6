"""Train STSC.

    python -m stsc_tf.train --flagfile=configs/isic.flags --data_dir=tfrecords/isic2018 --model_dir=runs/isic

Every flag is in stsc_tf/flags.py; the run folder's layout is in stsc_tf/training.py. Rerun the same command to
resume an interrupted run.
"""

from absl import app

from stsc_tf import cli, flags as flags_lib


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        cfg = flags_lib.train_config()
        from stsc_tf import training  # TensorFlow is imported only once the flags are known to parse

        training.run_training(cfg)


if __name__ == "__main__":
    flags_lib.define_train_flags()
    app.run(main)
