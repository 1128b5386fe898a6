"""Train STSC.

    python -m stsc_tf.train --flagfile=configs/isic.flags --data_dir=tfrecords/isic2018 --model_dir=runs/isic

Every flag is in stsc_tf/flags.py; the run folder's layout is in stsc_tf/run_folder.py. Rerun the same command to
resume an interrupted run; a rerun with other settings is refused (--allow_changes names harmless ones).
"""

from absl import app

from stsc_tf import cli, flags as flags_lib, training
from stsc_tf.models import registered_backbones


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        training.run_training(flags_lib.train_config(), allow_changes=flags_lib.allowed_changes())


if __name__ == "__main__":
    flags_lib.define_train_flags(registered_backbones())
    app.run(main)
