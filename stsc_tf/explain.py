"""Explain a run: Grad-CAM overlays, relation heatmaps and the relation distance curve, or stable sub-structures.

    python -m stsc_tf.explain gradcam --model_dir=runs/isic --images='photos/*.jpg' --out=cams [--plus_plus]
    python -m stsc_tf.explain relations --model_dir=runs/isic
    python -m stsc_tf.explain substructures --model_dir=runs/isic [--tsc_tau=1.0 --tsc_tau_mode=zscore]
"""

from absl import app

from stsc_tf import cli, explaining, flags as flags_lib

COMMANDS = {"gradcam": explaining.gradcam_run, "relations": explaining.relations_run,
            "substructures": explaining.substructures_run}


def main(argv):
    cli.setup_logging()
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise SystemExit(f"usage: python -m stsc_tf.explain {{{'|'.join(COMMANDS)}}} --model_dir=RUN [flags]")
    with cli.user_errors():
        written = COMMANDS[argv[1]](**flags_lib.explain_args(argv[1]))
        print("\n".join([written] if isinstance(written, str) else written))


if __name__ == "__main__":
    flags_lib.define_explain_flags()
    app.run(main)
