"""STSC step (this package, TensorFlow) vs SRC-MT's own PyTorch step, side by side on this CPU.

    .venv/bin/python benchmarks/vs_srcmt.py [--rounds=2] [--image_size=224] [--batch=16] [--repeat=5]
                                            [--threads=N] [-- STEP_COST_ARGS...]

Target (BUILD.md): STSC step <= 0.70 x SRC-MT's PyTorch step at 224 px, batch 16, on the 2-core CPU.

Needs `.venv-torch` (`bash benchmarks/make_torch_env.sh`): the peer, benchmarks/srcmt_peer.py, runs there, since
torch is never a dependency of stsc_tf. This file imports neither torch nor TensorFlow: each side runs in its own
subprocess, one at a time (never both at once, so they do not share the 2 cores), for --rounds rounds:
  peer: .venv-torch/bin/python benchmarks/srcmt_peer.py --image_size=S --batch=B --labeled=B//4 --repeat=R
  ours: .venv/bin/python benchmarks/step_cost.py --backbone=densenet121 --image_size=S --batch=B --repeat=R
        --relation_features=avg [STEP_COST_ARGS...]
Arguments after `--` go to step_cost.py only and come last, so they override (e.g. `-- --relation_features=flatten`).
The order of the two sides flips every round (why: a drift in the machine's load, or its warming, then falls on
both sides alike). Both ends print a one-line JSON (stsc_s, supervised_s: medians, seconds); this prints a table per
round, the median ratios ours / peer over the rounds, and ends with a one-line JSON summary.

Run it on a quiet machine. Before each side starts, the share of the CPUs that other processes keep busy is
sampled for 2 s (from /proc/stat, while nothing of this benchmark runs) and printed; above 10 % a warning says the
ratio is not to be quoted. Why: other load can slow the peer far more than ours. PyTorch's OpenMP threads
spin-wait at every barrier, so one descheduled thread stalls the rest (measured here beside two busy processes:
the peer's 64 px supervised step 0.3 to 4.3 s, against 0.17 s when the CPUs were less busy; OMP_WAIT_POLICY=PASSIVE
brought it back to 0.3 s), which flatters the ratio. --peer_omp_passive runs the peer with OMP_WAIT_POLICY=PASSIVE:
less hurt by other load, but not torch as shipped, so a quiet machine and the default stay the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PY = os.path.join(ROOT, ".venv-torch", "bin", "python")
TARGET = 0.70
BUSY_WARN = 0.10


def cpu_busy(seconds: float = 2.0) -> float | None:
    """Share of all CPUs busy over `seconds` (from /proc/stat; None where there is none)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, total (without guest, already in user)
    try:
        i0, t0 = sample()
        time.sleep(seconds)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Runs one side to the end and returns its last JSON line; prints its human-readable lines."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        sys.exit(f"vs_srcmt: `{shlex.join(cmd)}` failed with exit code {proc.returncode}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    json_lines = [ln for ln in lines if ln.lstrip().startswith("{")]
    if not json_lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        sys.exit(f"vs_srcmt: `{shlex.join(cmd)}` printed no JSON summary")
    for ln in lines:
        if ln is not json_lines[-1]:
            print("    | " + ln)
    out = json.loads(json_lines[-1])
    out["wall_s"] = wall
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Arguments after `--` are passed to step_cost.py.")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--image_size", type=int, default=224, help="both sides")
    p.add_argument("--batch", type=int, default=16, help="both sides; a quarter labeled on both (SRC-MT's 1:4)")
    p.add_argument("--repeat", type=int, default=5, help="timed steps per side and round (medians)")
    p.add_argument("--threads", type=int, default=None,
                   help="peer's torch threads (default: all cores, as TensorFlow uses for ours)")
    p.add_argument("--peer_omp_passive", action="store_true",
                   help="run the peer with OMP_WAIT_POLICY=PASSIVE (a busy machine only: not torch's default)")
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = p.parse_args(argv)

    if not os.path.exists(TORCH_PY):
        sys.exit("vs_srcmt: .venv-torch is missing (the peer's PyTorch environment): "
                 "run `bash benchmarks/make_torch_env.sh` first")
    ours_py = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(ours_py):
        ours_py = sys.executable
    # Labeled share: step_cost.py labels batch // 4 rows (common.make_batch); the peer gets the same count.
    peer_cmd = [TORCH_PY, "benchmarks/srcmt_peer.py", f"--image_size={args.image_size}", f"--batch={args.batch}",
                f"--labeled={args.batch // 4}", f"--repeat={args.repeat}"]
    if args.threads:
        peer_cmd.append(f"--threads={args.threads}")
    ours_cmd = [ours_py, "benchmarks/step_cost.py", "--backbone=densenet121", f"--image_size={args.image_size}",
                f"--batch={args.batch}", f"--repeat={args.repeat}", "--relation_features=avg", *extra]
    peer_env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if args.peer_omp_passive else None
    rel = lambda cmd: shlex.join([os.path.relpath(cmd[0], ROOT), *cmd[1:]])  # noqa: E731
    print(f"vs_srcmt: {args.rounds} round(s), {args.image_size} px, batch {args.batch}, repeat {args.repeat}")
    print(f"  peer: {'OMP_WAIT_POLICY=PASSIVE ' if peer_env else ''}{rel(peer_cmd)}")
    print(f"  ours: {rel(ours_cmd)}")

    rounds = []
    for r in range(args.rounds):
        order = [("peer", peer_cmd, peer_env), ("ours", ours_cmd, None)]
        if r % 2:
            order.reverse()
        res = {}
        for name, cmd, env in order:
            busy = cpu_busy()
            note = "" if busy is None or busy <= BUSY_WARN else "  WARNING: the machine is not quiet"
            print(f"round {r + 1}: {name} ... (other processes busy: "
                  f"{'?' if busy is None else f'{100 * busy:.0f} %'} of the CPUs){note}", flush=True)
            res[name] = run(cmd, env)
            res[name]["busy_before"] = busy
        peer, ours = res["peer"], res["ours"]
        row = {"peer_stsc_s": peer["stsc_s"], "ours_stsc_s": ours["stsc_s"],
               "ratio_stsc": ours["stsc_s"] / peer["stsc_s"],
               "peer_supervised_s": peer["supervised_s"], "ours_supervised_s": ours["supervised_s"],
               "ratio_supervised": ours["supervised_s"] / peer["supervised_s"],
               "peer_first_step_s": peer.get("first_step_s"), "peer_wall_s": peer["wall_s"],
               "ours_wall_s": ours["wall_s"], "busy_before_peer": peer["busy_before"],
               "busy_before_ours": ours["busy_before"], "torch": peer.get("torch"), "threads": peer.get("threads")}
        rounds.append(row)
        print(f"round {r + 1} ({' then '.join(o[0] for o in order)}):")
        print(f"  {'step':<12}{'peer (s)':>10}{'ours (s)':>10}{'ours/peer':>11}")
        print(f"  {'STSC':<12}{row['peer_stsc_s']:>10.3f}{row['ours_stsc_s']:>10.3f}{row['ratio_stsc']:>11.3f}")
        print(f"  {'supervised':<12}{row['peer_supervised_s']:>10.3f}{row['ours_supervised_s']:>10.3f}"
              f"{row['ratio_supervised']:>11.3f}", flush=True)

    med = {k: statistics.median(row[k] for row in rounds)
           for k in ("peer_stsc_s", "ours_stsc_s", "ratio_stsc", "peer_supervised_s", "ours_supervised_s",
                     "ratio_supervised")}
    meets = med["ratio_stsc"] <= TARGET
    busy = [b for row in rounds for b in (row["busy_before_peer"], row["busy_before_ours"]) if b is not None]
    quiet = all(b <= BUSY_WARN for b in busy)
    print(f"medians over {len(rounds)} round(s) ({args.image_size} px, batch {args.batch}, CPU, "
          f"torch {rounds[0]['torch']} with {rounds[0]['threads']} threads):")
    print(f"  STSC step ours / SRC-MT peer      = {med['ratio_stsc']:.3f}"
          f"  ({med['ours_stsc_s']:.3f} s vs {med['peer_stsc_s']:.3f} s; target <= {TARGET:.2f}:"
          f" {'met' if meets else 'NOT met'})")
    print(f"  supervised step ours / peer       = {med['ratio_supervised']:.3f}"
          f"  ({med['ours_supervised_s']:.3f} s vs {med['peer_supervised_s']:.3f} s)")
    if not quiet:
        print(f"  WARNING: other processes kept up to {100 * max(busy):.0f} % of the CPUs busy: these figures"
              " flatter ours (the peer's OpenMP threads suffer most) and are not to be quoted")
    print(f"  command: {shlex.join(['.venv/bin/python', 'benchmarks/vs_srcmt.py', *sys.argv[1:]])}")
    print(json.dumps({"benchmark": "vs_srcmt", "image_size": args.image_size, "batch": args.batch,
                      "labeled": args.batch // 4, "repeat": args.repeat, "rounds": len(rounds),
                      **{k: round(v, 4) for k, v in med.items()}, "target_ratio_stsc": TARGET,
                      "meets_target": meets, "quiet": quiet,
                      "max_busy_before": round(max(busy), 3) if busy else None, "torch": rounds[0]["torch"],
                      "peer_threads": rounds[0]["threads"],
                      "peer_omp_passive": args.peer_omp_passive,
                      "ours_args": extra, "per_round": [{k: (round(v, 4) if isinstance(v, float) else v)
                                                         for k, v in row.items()} for row in rounds]}))


if __name__ == "__main__":
    main()
