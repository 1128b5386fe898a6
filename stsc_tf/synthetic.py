"""Write a small, learnable dataset in the raw ISIC 2018 or ChestX-ray14 layout (for trying the package out).

    python -m stsc_tf.synthetic --layout=isic2018 --out=/tmp/synth_isic --num_images=400 --image_size=96

The library is stsc_tf/data/synthetic.py (its docstring says what the images look like).
"""

from absl import app

from stsc_tf import cli, flags as flags_lib
from stsc_tf.data import synthetic


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        layout, out, n, size, seed = flags_lib.synthetic_args()
        synthetic.LAYOUTS[layout](out, n, size, seed)
        print(f"wrote a synthetic {layout} layout with {n} images of {size} px to {out}")


if __name__ == "__main__":
    flags_lib.define_synthetic_flags()
    app.run(main)
