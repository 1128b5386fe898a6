"""Convert a raw dataset to TFRecords.

    python -m stsc_tf.convert --dataset=isic2018 --source_dir=/data/ISIC2018 --output_dir=tfrecords/isic2018
    python -m stsc_tf.convert --dataset=chestxray14 --source_dir=/data/ChestX-ray14 --output_dir=tfrecords/chestxray14
    python -m stsc_tf.convert --verify --output_dir=tfrecords/isic2018      # check an existing conversion

Prints progress and a summary (written / skipped / per class / per split). See stsc_tf/data/convert.py.
"""

from absl import app

from stsc_tf import cli, flags as flags_lib


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        cfg = flags_lib.convert_config()
        # Imported here, not at the top: the converter's spawned worker processes re-import this module, and must
        # not pay TensorFlow's 3.5 s import each (BUILD.md, Converter: 2 workers were slower than 1 when they did).
        from stsc_tf.data import convert as convert_lib

        if not cfg.source_dir:
            print(f"verified {cfg.output_dir}: {convert_lib.verify_dataset(cfg.output_dir)} records")
        else:
            convert_lib.convert(cfg)


if __name__ == "__main__":
    flags_lib.define_convert_flags()
    app.run(main)
