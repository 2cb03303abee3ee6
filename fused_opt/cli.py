"""The `fused-opt` command: `fused-opt demo`, `fused-opt bench`, `fused-opt info`."""

from __future__ import annotations

import argparse
import sys


LISTS = ("gpt2-small", "gpt-1b", "10000x4096", "5000x1000", "resnet50-cl")  # benchmark.PARAM_LISTS (imported late)


def _bench(args) -> int:
    from . import benchmark

    def progress(runs):
        try:
            from tqdm import tqdm
        except ImportError:  # the table still comes at the end
            return runs
        bar = tqdm(runs, unit="run", dynamic_ncols=True)
        for item in bar:
            bar.set_description(f"{item[0]} {item[1]} {item[2].algorithm} {item[2].name}")
            yield item

    def partial(report):  # the table so far, on disk after every row (a time limit loses only the rest)
        benchmark.save(report, args.out, args.tag, with_chart=False)

    report = benchmark.run(device=args.device, quick=args.quick, reps=args.reps, lists=args.lists,
                           algorithms=args.algorithms, dtypes=tuple(args.dtypes),
                           regularisations=tuple(args.regularisations), backends=args.backends,
                           progress=progress, partial=partial if args.tag else None)
    print(benchmark.markdown(report))
    if args.tag:
        for path in benchmark.save(report, args.out, args.tag, with_chart=not args.no_chart):
            print("wrote", path)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fused-opt", description="fused optimizers for PyTorch")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("finetune", help="the reference fine-tune (MiniLM on BBC News), torch.optim vs fused_opt",
                   add_help=False)
    sub.add_parser("demo", help="a small Transformer trained with torch.optim and fused_opt side by side")
    sub.add_parser("info", help="versions, and which backends can run here")
    b = sub.add_parser("bench", help="step time and GB/s against torch.optim and the memory roofline")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--quick", action="store_true", help="scaled-down parameter lists: seconds, not minutes")
    b.add_argument("--reps", type=int, default=None, help="timed steps per run (default 9, quick 5)")
    b.add_argument("--lists", nargs="*", choices=LISTS,
                   help="parameter lists, measured in this order (default: all for the device)")
    b.add_argument("--algorithms", nargs="*", help="Adam AdamW RMSprop SGD-momentum")
    b.add_argument("--dtypes", nargs="*", default=["fp32"], choices=("fp32", "bf16"))
    b.add_argument("--backends", nargs="*", help="fused_opt backends to include (default: all usable)")
    b.add_argument("--regularisations", nargs="*", default=["none", "l1l2", "l1prox"],
                   choices=("none", "l1l2", "l1prox"), help="plain, +L1 (subgradient) +L2, +L1 (proximal) +L2")
    b.add_argument("--tag", help="save <out>/<device>-<tag>.json, .md and .png")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--no-chart", action="store_true")
    args, rest = ap.parse_known_args(argv)
    if args.command == "demo":
        from . import demo
        return demo.main(rest)
    if args.command == "finetune":
        from . import finetune
        return finetune.main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        from . import info
        print(info.report())
        return 0
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
