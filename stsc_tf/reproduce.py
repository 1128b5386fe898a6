"""Reproduce the paper's ablation tables: one training run per row, each in its own folder, then a Markdown table.

    python -m stsc_tf.reproduce --table=4 --flagfile=configs/isic.flags --data_dir=... --model_dir=runs/table4
    python -m stsc_tf.reproduce --table=3 --flagfile=configs/demo.flags --data_dir=demo_out/records \
        --model_dir=demo_out/table3

Table 4: the eight on/off combinations of L_c, L_sc, L_tc (a weight of 0 removes a term), at the flagfile's
ratio. Table 3: STSC at 10, 20, 30 and 50 % labeled data. The paper's own numbers (ISIC 2018, DenseNet-121, full
data) stand beside ours; on other data or settings they are a reference point, not a target. A finished row
(its metrics.json exists) is not run again, so an interrupted reproduction resumes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

from absl import app

from stsc_tf import cli, flags as flags_lib, training
from stsc_tf.files import atomic_write_text
from stsc_tf.models import registered_backbones

# The paper's Table 4 (ISIC 2018, 20 % labeled): (L_c, L_sc, L_tc) -> (Acc, Sen, Spec, AUC).
PAPER_TABLE4 = {
    (0, 0, 0): (91.66, 65.39, 92.01, 85.38), (1, 0, 0): (92.45, 67.88, 92.08, 87.24),
    (0, 1, 0): (91.67, 65.25, 91.44, 84.60), (0, 0, 1): (92.18, 66.04, 91.29, 86.83),
    (1, 1, 0): (92.26, 65.95, 91.70, 89.18), (1, 0, 1): (92.10, 63.81, 89.50, 88.57),
    (0, 1, 1): (92.44, 66.91, 92.09, 86.23), (1, 1, 1): (93.95, 72.60, 92.94, 93.73),
}
# The paper's Table 3, STSC rows: labeled ratio -> (Acc, Sen, Spec, AUC, F1).
PAPER_TABLE3 = {0.1: (91.12, 68.36, 91.48, 91.29, 52.17), 0.2: (93.95, 72.60, 92.94, 93.73, 60.84),
                0.3: (94.12, 73.46, 92.75, 93.69, 63.23), 0.5: (93.68, 76.78, 93.47, 94.53, 66.24)}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _run(cfg, folder: str) -> dict:
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        training.run_training(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model_dir=folder)),
                              bootstrap=0)
    with open(path) as f:
        return json.load(f)


def table4(cfg) -> str:
    mark = {0: "×", 1: "✓"}
    lines = ["| L_c | L_sc | L_tc | Acc | Sen | Spec | AUC | paper Acc | paper Sen | paper Spec | paper AUC |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = cfg.loss
    for combo in itertools.product((0, 1), repeat=3):
        c, sc, tc = combo
        loss = dataclasses.replace(base, consistency_weight_c=base.consistency_weight_c * c, beta=base.beta * sc,
                                   gamma=base.gamma * tc)
        name = f"c{c}_sc{sc}_tc{tc}"
        result = _run(dataclasses.replace(cfg, loss=loss), os.path.join(cfg.train.model_dir, name))
        p = result[cfg.train.eval_with]["paper"]
        ours = " | ".join(_pct(p[k]) for k in ("accuracy", "sensitivity", "specificity", "auc"))
        paper = " | ".join(f"{v:.2f}" for v in PAPER_TABLE4[combo])
        lines.append(f"| {mark[c]} | {mark[sc]} | {mark[tc]} | {ours} | {paper} |")
    return "\n".join(lines)


def table3(cfg) -> str:
    lines = ["| D_L (%) | D_U (%) | Acc | Sen | Spec | AUC | F1 | paper Acc | paper Sen | paper Spec | paper AUC | "
             "paper F1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ratio in sorted(PAPER_TABLE3):
        data = dataclasses.replace(cfg.data, labeled_ratio=ratio)
        folder = os.path.join(cfg.train.model_dir, f"ratio{int(ratio * 100)}")
        result = _run(dataclasses.replace(cfg, data=data), folder)
        p = result[cfg.train.eval_with]["paper"]
        ours = " | ".join(_pct(p[k]) for k in ("accuracy", "sensitivity", "specificity", "auc", "f1"))
        paper = " | ".join(f"{v:.2f}" for v in PAPER_TABLE3[ratio])
        lines.append(f"| {100 * ratio:g} | {100 * (1 - ratio):g} | {ours} | {paper} |")
    return "\n".join(lines)


def main(argv):
    cli.no_extra_args(argv)
    with cli.user_errors():
        cfg = flags_lib.train_config()
        training.validate(cfg)  # every bad flag fails before the first run
        table = table4(cfg) if flags_lib.FLAGS.table == 4 else table3(cfg)
        title = {4: "Table 4: consistency terms", 3: "Table 3: labeled ratios"}[flags_lib.FLAGS.table]
        text = f"## {title} ({cfg.train.eval_with}; ours beside the paper's ISIC 2018 numbers)\n\n{table}\n"
        path = os.path.join(cfg.train.model_dir, f"table{flags_lib.FLAGS.table}.md")
        atomic_write_text(path, text)
        print(text + f"\nwritten to {path}")


if __name__ == "__main__":
    flags_lib.define_train_flags(registered_backbones())
    flags_lib.define_reproduce_flags()
    app.run(main)
