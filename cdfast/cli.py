"""The ``cdfast`` command line (also ``python -m cdfast``).

    cdfast train resnet20 --epochs 3            train (or load the cached) teacher
    cdfast compress resnet20 --k 5 --keep 0.5   compress it from 5 samples per class
    cdfast experiment --models resnet20 --tasks channel --ks 1 5 --seeds 0 1 2
    cdfast study --model resnet20 --ks 1 5      when does crossing help (per layer, vs M/D)
    cdfast demo                                 the README's short demonstration
"""
from __future__ import annotations

import argparse
import json
import sys


def _compression(args):
    from .layer import constraints as c

    items = []
    if args.keep is not None:
        items.append(c.ChannelPrune(args.keep))
    if args.density is not None:
        items.append(c.WeightPrune(args.density))
    if args.bits is not None:
        items.append(c.Quantize(args.bits))
    return items or None


def cmd_train(args) -> int:
    from .experiments.data import load_fashion_mnist
    from .experiments.train import evaluate, train_teacher

    model = train_teacher(args.model, epochs=args.epochs, seed=args.seed)
    print(f"{args.model}: {evaluate(model.eval(), load_fashion_mnist('test')):.2f}% test accuracy")
    return 0


def cmd_compress(args) -> int:
    import torch

    from .model.compress import compress
    from .experiments.data import few_shot, load_fashion_mnist
    from .experiments.train import evaluate, train_teacher

    teacher = train_teacher(args.model, epochs=args.epochs).eval()
    x, _ = few_shot(load_fashion_mnist("train"), args.k, seed=args.seed).tensors
    policy = args.policy or ("resnet" if args.model.startswith("resnet") else "skip_first")
    small, report = compress(teacher, x, compression=_compression(args), loss=args.loss, mu=args.mu,
                             solver=args.solver, steps=args.steps, policy=policy, checkpoint=args.checkpoint)
    test = load_fashion_mnist("test")
    print(f"\nwalk: {report.walk}; {report.samples} samples; {report.seconds:.1f} s")
    print(f"params {report.params_before:,} -> {report.params_after:,}; "
          f"FLOPs {report.flops_before:,} -> {report.flops_after:,}")
    print(f"accuracy: teacher {evaluate(teacher, test):.2f}%, compressed {evaluate(small.eval(), test):.2f}%")
    if args.report:
        report.to_json(args.report)
    if args.output:
        torch.save(small, args.output)
        print(f"compressed model saved to {args.output}")
    return 0


def cmd_experiment(args) -> int:
    import os

    from .experiments.grid import markdown, read_rows, run_experiment, write_outputs

    csv_path = os.path.join(args.out, "results.csv")  # run_experiment creates the folder
    rows = run_experiment(models=args.models, tasks=args.tasks, ks=args.ks, seeds=args.seeds, methods=args.methods,
                          solver=args.solver, steps=args.steps, epochs=args.epochs, test_limit=args.test_limit,
                          csv_path=csv_path)
    # the tables cover every row in the folder: earlier runs with other models or tasks included
    paths = write_outputs(read_rows(csv_path) if os.path.exists(csv_path) else rows, args.out)
    print(markdown(rows))
    print(json.dumps(paths, indent=1))
    return 0


def cmd_study(args) -> int:
    from .experiments.data import few_shot, load_fashion_mnist
    from .experiments.study import crossing_study, write_study
    from .experiments.train import train_teacher

    teacher = train_teacher(args.model, epochs=args.epochs).eval()
    train = load_fashion_mnist("train")
    held_out = load_fashion_mnist("test").tensors[0][: args.held_out]
    draws = {(k, s): few_shot(train, k, seed=s).tensors[0] for k in args.ks for s in args.seeds}
    policy = "resnet" if args.model.startswith("resnet") else "skip_first"
    rows = crossing_study(teacher, draws, held_out, keep=args.keep, mu=args.mu, policy=policy)
    print(write_study(rows, args.out))
    return 0


def cmd_demo(args) -> int:
    from .experiments.demo import main

    return main(k=args.k, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdfast", description="Few-shot network compression by cross distillation")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or load the cached) Fashion-MNIST teacher")
    t.add_argument("model", help="resnet20, resnet56, vgg_small, vgg16, small_cnn")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compress", help="compress a cached teacher from K samples per class")
    c.add_argument("model")
    c.add_argument("--k", type=int, default=5, help="samples per class")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--epochs", type=int, default=3, help="teacher training epochs (cached)")
    c.add_argument("--keep", type=float, help="channel pruning: fraction of input channels kept")
    c.add_argument("--density", type=float, help="unstructured pruning: fraction of weights kept")
    c.add_argument("--bits", type=int, help="weight quantization bits (2..8)")
    c.add_argument("--loss", default="cross", choices=["nc", "correction", "imitation", "cross", "soft"])
    c.add_argument("--mu", type=float, default=0.9)
    c.add_argument("--solver", default="adam", choices=["adam", "sgd", "exact"])
    c.add_argument("--steps", type=int, default=3000)
    c.add_argument("--policy", choices=["all", "skip_first", "resnet"])
    c.add_argument("--checkpoint", help="resume file, written after every layer")
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--output", help="save the compressed model (torch.save) here")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("experiment", help="the paper's tables on Fashion-MNIST")
    e.add_argument("--models", nargs="+", default=["resnet20"])
    e.add_argument("--tasks", nargs="+", default=["channel"], choices=["channel", "weight", "w4", "w2"])
    e.add_argument("--ks", nargs="+", type=int, default=[1, 2, 5, 10])
    e.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    e.add_argument("--methods", nargs="+", default=None,
                   help="run only these methods (default: every method of each task)")
    e.add_argument("--solver", default="exact", choices=["adam", "sgd", "exact"])
    e.add_argument("--steps", type=int, default=3000)
    e.add_argument("--epochs", type=int, default=3)
    e.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    e.add_argument("--out", default="docs/results",
                   help="folder of results.csv (appended row by row; a rerun skips rows already there), "
                        "results.md and the plots")
    e.set_defaults(func=cmd_experiment)

    st = sub.add_parser("study", help="per-layer drift of cross vs nc against M/D")
    st.add_argument("--model", default="resnet20")
    st.add_argument("--epochs", type=int, default=3)
    st.add_argument("--ks", nargs="+", type=int, default=[1, 2, 5, 10])
    st.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    st.add_argument("--keep", type=float, default=0.5)
    st.add_argument("--mu", type=float, default=0.9)
    st.add_argument("--held-out", type=int, default=1000)
    st.add_argument("--out", default="docs/results/study")
    st.set_defaults(func=cmd_study)

    d = sub.add_parser("demo", help="short whole-model demonstration (a few minutes on 2 cores)")
    d.add_argument("--k", type=int, default=5)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"cdfast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
