"""Peer benchmark: SRC-MT's own PyTorch training step (DenseNet-121, mean teacher + relation consistency) on CPU.

    .venv-torch/bin/python benchmarks/srcmt_peer.py [--image_size=224] [--batch=16] [--labeled=4] [--repeat=5]
                                                    [--warmup=2] [--threads=N]

Runs in the separate `.venv-torch` environment (`bash benchmarks/make_torch_env.sh`); torch is never a dependency
of stsc_tf. `benchmarks/vs_srcmt.py` runs this file and `benchmarks/step_cost.py` one after the other and reports
the ratio ours / peer.

What is reproduced, from SRC-MT (liuquande/SRC-MT, code/train_SRC_MT.py, code/utils/losses.py,
code/networks/models.py, code/networks/densenet.py):
- the network: SRC-MT's densenet.py DenseNet-121 (growth 32, blocks (6, 12, 24, 16), bn_size 4, 64 initial
  features; the old torchvision layout where each dense layer is an nn.Sequential and concatenates its input
  with its new features; its per-layer dropout is commented out in SRC-MT, so there is none here either), wrapped
  as models.DenseNet121 in 'U-Ones' mode: relu(features) -> global average pool -> Dropout(0.2) -> Linear(7);
  forward returns (activations, logits), activations being the dropped-out pooled vector;
- the teacher: a second DenseNet121 whose parameters are detached, left in train mode (SRC-MT never calls
  ema_model.eval() in training: dropout and batch statistics are live), run under torch.no_grad();
- the loss, with every term on (consistency weight 1.0, i.e. epoch > 20 and past the sigmoid ramp-up):
  losses.cross_entropy_loss on the first labeled_bs rows (softmax first, then CrossEntropyLoss with class
  weights 10000 / count, as SRC-MT does) + sum(softmax_mse_loss * CLASS_WEIGHT) / batch
  + sum(relation_mse_loss(activations, ema_activations)) / batch;
- Adam(lr 1e-4, betas (0.9, 0.999), weight_decay 5e-4), zero_grad / backward / step, then
  update_ema_variables(alpha 0.99, the true average for the first steps), then loss read back (SRC-MT's
  MetricLogger reads it every step).
Also timed for reference: a supervised-only step (student forward on the whole batch, the same CE on the labeled
rows, backward, a separate Adam) and, broken out, the teacher forward and the EMA update.

Not reproduced (none changes the work per step): ImageNet-pretrained weights (random He init instead: no
download here, and the values do not change the cost), DataParallel over 3 GPUs (SRC-MT's default --gpu=0,1,2
makes its global batch 48 with 12 labeled; batch 16 with 4 labeled is its per-GPU share), data loading and
augmentation (random float tensors, the two views distinct), TensorBoard logging every 100 steps.

Ends with a one-line JSON summary (medians, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# SRC-MT's losses.py: ISIC 2018 class counts; class weight 10000 / count (used by the CE and the softmax MSE).
CLASS_NUM = [1113, 6705, 514, 327, 1099, 115, 142]
CLASS_WEIGHT = torch.tensor([10000 / i for i in CLASS_NUM], dtype=torch.float32)
N_CLASSES = len(CLASS_NUM)


# --- SRC-MT's code/networks/densenet.py (the parts used by densenet121; no pretrained loading, no prints) ---

class _DenseLayer(nn.Sequential):
    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate):
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(num_input_features))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("conv1", nn.Conv2d(num_input_features, bn_size * growth_rate,
                                           kernel_size=1, stride=1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(bn_size * growth_rate))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(bn_size * growth_rate, growth_rate,
                                           kernel_size=3, stride=1, padding=1, bias=False))
        # SRC-MT builds this layer but its use in forward is commented out: kept (parameter-free) for fidelity.
        self.drop_rate = drop_rate
        self.drop_layer = nn.Dropout(p=drop_rate)

    def forward(self, x):
        new_features = super().forward(x)
        return torch.cat([x, new_features], 1)


class _DenseBlock(nn.Sequential):
    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, drop_rate):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module("denselayer%d" % (i + 1), layer)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features, num_output_features):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features,
                                          kernel_size=1, stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4,
                 drop_rate=0, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features,
                                bn_size=bn_size, growth_rate=growth_rate, drop_rate=drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)


def densenet121(**kwargs):
    return DenseNet(num_init_features=64, growth_rate=32, block_config=(6, 12, 24, 16), **kwargs)


# --- SRC-MT's code/networks/models.py: DenseNet121, mode 'U-Ones' (the one train_SRC_MT.py uses) ---

class DenseNet121(nn.Module):
    def __init__(self, out_size, drop_rate=0.0):
        super().__init__()
        self.densenet121 = densenet121(drop_rate=drop_rate)
        num_ftrs = self.densenet121.classifier.in_features
        self.densenet121.classifier = nn.Sequential(nn.Linear(num_ftrs, out_size))
        for m in self.densenet121.modules():
            if isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)
        self.drop_rate = drop_rate
        self.drop_layer = nn.Dropout(p=drop_rate)

    def forward(self, x):
        features = self.densenet121.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1)).view(features.size(0), -1)
        if self.drop_rate > 0:
            out = self.drop_layer(out)
        self.activations = out
        out = self.densenet121.classifier(out)
        return self.activations, out


# --- SRC-MT's code/utils/losses.py (the three losses train_SRC_MT.py uses) ---

class cross_entropy_loss:
    """SRC-MT's CE: softmax of the logits fed to CrossEntropyLoss (which applies log-softmax again), class
    weighted, weighted mean. Reproduced as written, double softmax included."""

    def __init__(self):
        self.base_loss = nn.CrossEntropyLoss(weight=CLASS_WEIGHT, reduction="mean")

    def __call__(self, output, target):
        output_softmax = F.softmax(output, dim=1)
        target = torch.argmax(target, dim=1)
        return self.base_loss(output_softmax, target.long())


def softmax_mse_loss(input_logits, target_logits):
    assert input_logits.size() == target_logits.size()
    input_softmax = F.softmax(input_logits, dim=1)
    target_softmax = F.softmax(target_logits, dim=1)
    return (input_softmax - target_softmax) ** 2 * CLASS_WEIGHT


def relation_mse_loss(activations, ema_activations):
    assert activations.size() == ema_activations.size()
    activations = torch.reshape(activations, (activations.shape[0], -1))
    ema_activations = torch.reshape(ema_activations, (ema_activations.shape[0], -1))
    similarity = activations.mm(activations.t())
    norm = torch.reshape(torch.norm(similarity, 2, 1), (-1, 1))
    norm_similarity = similarity / norm
    ema_similarity = ema_activations.mm(ema_activations.t())
    ema_norm = torch.reshape(torch.norm(ema_similarity, 2, 1), (-1, 1))
    ema_norm_similarity = ema_similarity / ema_norm
    return (norm_similarity - ema_norm_similarity) ** 2


# --- SRC-MT's code/train_SRC_MT.py ---

def update_ema_variables(model, ema_model, alpha, global_step):
    # Use the true average until the exponential average is more correct
    alpha = min(1 - 1 / (global_step + 1), alpha)
    for ema_param, param in zip(ema_model.parameters(), model.parameters()):
        # SRC-MT's add_(1 - alpha, param.data) is the removed positional form of this call.
        ema_param.data.mul_(alpha).add_(param.data, alpha=1 - alpha)


def create_model(ema=False, drop_rate=0.2):
    model = DenseNet121(out_size=N_CLASSES, drop_rate=drop_rate)
    if ema:
        for param in model.parameters():
            param.detach_()
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--labeled", type=int, default=4, help="labeled rows per batch (SRC-MT's labeled_bs)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: os.cpu_count())")
    args = p.parse_args()
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(1337)  # SRC-MT's default seed

    batch_size, labeled_bs, consistency_weight, relation_weight = args.batch, args.labeled, 1.0, 1
    model = create_model()
    ema_model = create_model(ema=True)
    # Both of SRC-MT's models start from the same ImageNet weights: the teacher starts as a copy here too.
    ema_model.load_state_dict(model.state_dict())
    model.train()
    # ema_model stays in train mode as in SRC-MT (a fresh nn.Module is in train mode and nothing changes it).
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=5e-4)
    sup_optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=5e-4)
    loss_fn = cross_entropy_loss()

    g = torch.Generator().manual_seed(0)
    shape = (batch_size, 3, args.image_size, args.image_size)
    inputs = torch.randn(shape, generator=g)
    ema_inputs = torch.randn(shape, generator=g)  # the second augmented view, distinct from the first
    label_batch = F.one_hot(torch.randint(0, N_CLASSES, (batch_size,), generator=g), N_CLASSES).float()
    iter_num = [0]

    def stsc_step():
        activations, outputs = model(inputs)
        with torch.no_grad():
            ema_activations, ema_output = ema_model(ema_inputs)
        loss_classification = loss_fn(outputs[:labeled_bs], label_batch[:labeled_bs])
        consistency_dist = torch.sum(softmax_mse_loss(outputs, ema_output)) / batch_size
        consistency_loss = consistency_weight * consistency_dist
        consistency_relation_dist = torch.sum(relation_mse_loss(activations, ema_activations)) / batch_size
        consistency_relation_loss = consistency_weight * consistency_relation_dist * relation_weight
        loss = loss_classification + consistency_loss + consistency_relation_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_ema_variables(model, ema_model, 0.99, iter_num[0])
        iter_num[0] += 1
        return loss.item()  # SRC-MT's MetricLogger reads the losses every step

    def supervised_step():
        _, outputs = model(inputs)
        loss = loss_fn(outputs[:labeled_bs], label_batch[:labeled_bs])
        sup_optimizer.zero_grad()
        loss.backward()
        sup_optimizer.step()
        return loss.item()

    def teacher_forward():
        with torch.no_grad():
            _, ema_output = ema_model(ema_inputs)
        return ema_output.sum().item()

    def ema_update():
        update_ema_variables(model, ema_model, 0.99, iter_num[0])
        return 0.0

    def once(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    # The very first step of the process (allocator and oneDNN primitives cold), as a separate figure.
    first_step_s = once(stsc_step)
    fns = {"stsc_s": stsc_step, "supervised_s": supervised_step,
           "teacher_forward_s": teacher_forward, "ema_update_s": ema_update}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    # Interleaved repeats (why: a drift in the machine's load hits every variant alike, not the last one timed).
    times = {k: [] for k in fns}
    for _ in range(args.repeat):
        for k, fn in fns.items():
            times[k].append(once(fn))
    r = {k: statistics.median(v) for k, v in times.items()}
    r["first_step_s"] = first_step_s
    # Minima too (why: on a busy machine the peer's spinning OpenMP threads make its medians swing widely).
    r["stsc_min_s"], r["supervised_min_s"] = min(times["stsc_s"]), min(times["supervised_s"])

    print(f"SRC-MT peer (PyTorch {torch.__version__}, {threads} threads): DenseNet-121 at {args.image_size} px,"
          f" batch {batch_size} ({labeled_bs} labeled), CPU, medians of {args.repeat} after {args.warmup} warm-up")
    print(f"  images/s: supervised {batch_size / r['supervised_s']:.1f}, SRC-MT step {batch_size / r['stsc_s']:.1f}")
    names = {"supervised_s": "supervised", "stsc_s": "stsc (SRC-MT)", "teacher_forward_s": "teacher_forward",
             "ema_update_s": "ema_update", "first_step_s": "first_step"}
    for k, name in names.items():
        print(f"  {name:<16} {1000 * r[k]:9.1f} ms  ({r[k] / r['supervised_s']:.2f} x supervised)")
    print(f"  minima: supervised {1000 * r['supervised_min_s']:.1f} ms, stsc {1000 * r['stsc_min_s']:.1f} ms")
    print(json.dumps({"benchmark": "srcmt_peer", "image_size": args.image_size, "batch": batch_size,
                      "labeled": labeled_bs, **{k: round(v, 4) for k, v in r.items()},
                      "ratio_stsc_over_supervised": round(r["stsc_s"] / r["supervised_s"], 4),
                      "torch": torch.__version__, "threads": threads}))


if __name__ == "__main__":
    main()
