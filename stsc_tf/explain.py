"""Explain a run: Grad-CAM overlays, or relation heatmaps and the relation distance curve.

    python -m stsc_tf.explain gradcam --model_dir=runs/isic --images='photos/*.jpg' --out=cams [--plus_plus]
    python -m stsc_tf.explain relations --model_dir=runs/isic
"""

from absl import app

from stsc_tf import cli, flags as flags_lib

COMMANDS = ("gradcam", "relations")


def main(argv):
    cli.setup_logging()
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise SystemExit(f"usage: python -m stsc_tf.explain {{{'|'.join(COMMANDS)}}} --model_dir=RUN [flags]")
    with cli.user_errors():
        args = flags_lib.explain_args(argv[1])
        from stsc_tf import explaining

        paths = (explaining.gradcam_run if argv[1] == "gradcam" else explaining.relations_run)(**args)
        print("\n".join(paths))


if __name__ == "__main__":
    flags_lib.define_explain_flags()
    app.run(main)
