"""The ``jpqbench`` command line. Every Snakemake rule calls one of these subcommands.

    jpqbench list methods|datasets|models|cost-models [-v]   (methods also: --markdown)
    jpqbench prepare   --dataset D
    jpqbench pretrain  --dataset D [--model M] --seed S [--out CKPT]
    jpqbench run       --method M --dataset D [--model M] [--budget 0.05 ... --budget-metric bops|size]
                       [--seed S [--checkpoint CKPT] ...] [--epochs N] [--out DIR] [--nproc N]
    jpqbench cost      --model NAME --dataset D [--w-bits B --a-bits B | --plan plan.json] [--json]
    jpqbench init-tracking [--marker FILE]
    jpqbench aggregate [--out results/summary.csv]
    jpqbench report    [--summary results/summary.csv] [--out results/report] [--published CSV] [--reference METHOD]
    jpqbench export    --run-dir DIR
    jpqbench estimate  [--throughput FILE] [--img-per-s DATASET/MODEL=N ...] [--json] [--slurm-runtime]

All commands take ``--config`` (default ``config/config.yaml``). A user mistake prints
``error: <problem>`` and ``fix: <what to do>`` and exits with status 2. A compression run that
diverges is recorded as a result (its metrics.json has status ``diverged``) and ``run`` goes on
with its next budget and exits with status 0, so the grid goes on; a pretraining that diverges
exits with status 1. SIGTERM (Snakemake or a scheduler cancelling the job) raises
``SystemExit(143)``, so a run unwinds and closes its MLflow run as KILLED; a rerun resumes it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from jpqbench.base.errors import UserError

DEFAULT_CONFIG = "config/config.yaml"


def _config(args: argparse.Namespace):
    from jpqbench.base.config import load_config

    return load_config(args.config)


def cmd_list(args: argparse.Namespace) -> None:
    from jpqbench.base.registry import COST_MODELS, DATASETS, METHODS, MODELS

    if args.markdown:
        if args.what != "methods":
            raise UserError(f"--markdown documents methods only, not {args.what}",
                            "run `jpqbench list methods --markdown` (or drop --markdown)")
        from jpqbench.pipeline.method_docs import render_method_docs

        sys.stdout.write(render_method_docs())
        return
    from jpqbench.pipeline.method_docs import docstring_summary

    registry = {"methods": METHODS, "datasets": DATASETS, "models": MODELS, "cost-models": COST_MODELS}[args.what]
    for name in registry.names():
        obj = registry.get(name)
        print(f"{name:24s} {docstring_summary(obj)}")
        if args.verbose and args.what == "methods":
            print(f"{'':24s} defined in {registry.file_of(name)}")
            for field, info in obj.Hparams.model_fields.items():
                print(f"{'':24s}   {field} = {info.default!r}: {info.description}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from jpqbench.base.registry import DATASETS
    from jpqbench.harness.data import mark_prepared

    config = _config(args)
    root = Path(config.data_root) / args.dataset
    plugin = DATASETS.get(args.dataset)()
    plugin.prepare(root)
    mark_prepared(plugin, args.dataset, root)
    print(f"prepared {args.dataset} in {root}")


def _import_training_stack() -> None:
    """Import what a training run loads lazily (torch's optimizer machinery pulls in
    torch._dynamo, MLflow its SQL store) before the run starts, so a run's timers measure
    the run and not Python's import system; benchmarks/grid_walltime.py reports start-up separately."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import torch._dynamo  # noqa: F401


def cmd_pretrain(args: argparse.Namespace) -> None:
    _import_training_stack()
    from jpqbench.pipeline.runner import default_checkpoint, pretrain

    config = _config(args)
    model = config.recipe(args.dataset, args.model).model
    out = Path(args.out) if args.out else default_checkpoint(config, args.dataset, model, args.seed)
    result = pretrain(config, args.dataset, model, args.seed, out)
    if result:  # empty in the ranks other than 0 of a torchrun launch, which write nothing
        print(f"pretrained {out}: val top-1 {result['val_top1']:.4f}")


def _budgets(args: argparse.Namespace) -> list:
    """The run's budgets; ``[None]`` for a budget-free method."""
    from jpqbench.base.budget import Budget

    return [Budget(args.budget_metric, target) for target in args.budget] if args.budget else [None]


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus ``--nproc N``, for the processes torchrun starts."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _seed_checkpoints(args: argparse.Namespace) -> list[tuple[int, str | None]]:
    """The run's seeds, each with its ``--checkpoint`` (paired in order) or None (the grid's default)."""
    seeds = args.seed or [0]
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seed lists a seed twice ({' '.join(map(str, seeds))})", "give each seed once")
    if args.checkpoint and len(args.checkpoint) != len(seeds):
        raise UserError(f"{len(args.checkpoint)} --checkpoint for {len(seeds)} --seed: each seed's run starts from "
                        "its own checkpoint", "give one --checkpoint per --seed, in the same order, or none "
                        "(the grid's checkpoint of each seed, pretrained if absent)")
    return list(zip(seeds, args.checkpoint or [None] * len(seeds)))


def cmd_run(args: argparse.Namespace) -> int | None:
    _import_training_stack()
    from jpqbench.harness.distributed import is_main_process, launch, world_size
    from jpqbench.pipeline.grid import GridPoint
    from jpqbench.pipeline.runner import (
        RunRequest,
        default_checkpoint,
        default_run_dir,
        load_data,
        run_or_record_divergence,
        validate_request,
    )

    config = _config(args)
    model = config.recipe(args.dataset, args.model).model
    budgets = _budgets(args)
    seed_checkpoints = _seed_checkpoints(args)
    if args.out and len(budgets) * len(seed_checkpoints) > 1:
        raise UserError("--out names one run folder but several --budget or --seed values were given",
                        "drop --out (each run gets its own folder under results_root/runs) or pass one "
                        "--budget and one --seed")
    requests = [RunRequest(args.method, args.dataset, model, seed, budget,
                           Path(checkpoint) if checkpoint else default_checkpoint(config, args.dataset, model, seed),
                           Path(args.out) if args.out else
                           default_run_dir(config, GridPoint(args.dataset, model, args.method, budget, seed)),
                           args.epochs, pretrain_if_missing=checkpoint is None)
                for seed, checkpoint in seed_checkpoints for budget in budgets]
    if args.nproc is not None and args.nproc > 1 and world_size() > 1:
        raise UserError("--nproc was given inside a torchrun launch", "use either torchrun or --nproc, not both")
    if args.nproc is not None and args.nproc > 1:  # validated here once, then launched under torchrun
        for request in requests:
            validate_request(config, request, processes=args.nproc)
        return launch(args.nproc, _without_nproc(args.argv))  # torchrun's exit status
    for request in requests:
        validate_request(config, request)
    data = load_data(config, args.dataset)
    for request in requests:  # one process for several runs: start-up and data loading are paid once
        metrics = run_or_record_divergence(config, request, data)
        if metrics.get("status") == "diverged":
            print(f"{args.method} on {args.dataset}/{model} (seed {request.seed}, {request.budget.key if request.budget else 'reference'}) diverged: "
                  f"{metrics['error']}\nrecorded as status 'diverged' in {request.out / 'metrics.json'}", file=sys.stderr)
            continue
        if not is_main_process():  # under torchrun, rank 0 reports
            continue
        budget, out = request.budget, request.out
        target = f"{metrics['budget']:g} {metrics['budget_metric']}" if budget else "reference"
        print(f"{args.method} on {args.dataset}/{model} (seed {request.seed}, budget {target}): "
              f"top-1 {metrics['top1']:.4f}, relative BOPs {metrics['relative_bops']:.4f}, relative size "
              f"{metrics['relative_size']:.4f} ({metrics['weight_size_kb']:.2f} kB), "
              f"target met: {metrics['target_met']}\nwrote {out}")


def cmd_cost(args: argparse.Namespace) -> None:
    from jpqbench.accounting.counter import count
    from jpqbench.accounting.plan import (
        CompressionPlan,
        PlanMismatch,
        check_fits,
        with_uniform_bits,
    )
    from jpqbench.base.registry import DATASETS, MODELS

    builder = MODELS.get(args.model)
    if args.input_shape:
        input_shape, num_classes = tuple(args.input_shape), args.num_classes
    else:
        plugin = DATASETS.get(args.dataset)
        input_shape, num_classes = tuple(plugin.input_shape), plugin.num_classes
    model = builder(num_classes, input_shape)
    if args.plan and (args.w_bits or args.a_bits):
        raise UserError("--plan and --w-bits/--a-bits are exclusive", "pass either a plan or uniform bit widths")
    plan = CompressionPlan.load(args.plan) if args.plan else CompressionPlan.dense(model)
    try:
        check_fits(plan, model)  # a plan.json edited or written for another model is refused, not counted
    except PlanMismatch as error:
        raise UserError(f"plan does not fit model {args.model}: {error.problem}",
                        "pass a plan written for this model") from None
    if args.w_bits or args.a_bits:
        plan = with_uniform_bits(plan, args.w_bits or 32, args.a_bits or 32)
    try:
        report = count(model, input_shape, plan)
    except ValueError as error:
        raise UserError(f"plan does not fit model {args.model}: {error}", "pass a plan written for this model") from None
    figures = report.to_dict()
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        for key, value in figures.items():
            print(f"{key:22s} {value:,.6g}")


def cmd_init_tracking(args: argparse.Namespace) -> None:
    from jpqbench.pipeline.tracking import init_tracking, tracking_uri

    config = _config(args)
    experiment_id = init_tracking(config)
    print(f"MLflow store {tracking_uri(config)}, experiment {config.experiment!r} ({experiment_id}); in `mlflow ui` "
          f"its runs are at http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    if args.marker:
        Path(args.marker).parent.mkdir(parents=True, exist_ok=True)
        Path(args.marker).write_text(f"{tracking_uri(config)}\n{experiment_id}\n")


def cmd_aggregate(args: argparse.Namespace) -> None:
    from jpqbench.pipeline.aggregate import aggregate

    config = _config(args)
    frame = aggregate(Path(config.results_root) / "runs", Path(args.out), config)
    print(f"wrote {args.out} ({len(frame)} runs)")


def cmd_report(args: argparse.Namespace) -> None:
    from jpqbench.pipeline.report import PUBLISHED, render

    html = render(Path(args.summary), Path(args.out), Path(args.published or PUBLISHED), args.reference)
    print(f"wrote {html}")


def cmd_export(args: argparse.Namespace) -> None:
    from jpqbench.pipeline.reexport import reexport

    figures = reexport(_config(args), Path(args.run_dir))
    print(f"wrote {Path(args.run_dir) / 'model.jpq'}: {figures['artifact_bytes']:,} bytes "
          f"(counted {figures['artifact_counted_bytes']:,.0f} + overhead {figures['artifact_overhead_bytes']:,.0f}), "
          f"exported top-1 {figures['export_top1']:.4f} ({figures['export_top1_delta_pp']:+.2f} pp"
          f"{', FLAGGED' if figures['export_flagged'] else ''}), latency batch 1: dense "
          f"{figures['latency_dense_b1_ms']:.3f} ms, pruned {figures['latency_pruned_b1_ms']:.3f} ms")


def cmd_estimate(args: argparse.Namespace) -> None:
    from jpqbench.pipeline.estimate import (
        estimate,
        parse_img_per_s,
        read_throughput,
        render_slurm,
        render_table,
        to_json,
    )

    config = _config(args)
    device, img_per_s = read_throughput(Path(args.throughput)) if args.throughput else (None, {})
    img_per_s.update(parse_img_per_s(args.img_per_s or []))
    if args.slurm_runtime and not img_per_s:
        raise UserError("--slurm-runtime needs the throughput of the config's (dataset, model) pairs",
                        "pass --throughput FILE (written by benchmarks/throughput.py) or --img-per-s DATASET/MODEL=N")
    rows = estimate(config, img_per_s)
    if args.json:
        print(json.dumps(to_json(rows, device, args.slurm_runtime), indent=1))
        return
    print(render_table(rows, bool(img_per_s), device))
    if args.slurm_runtime:
        print(f"\n{render_slurm(rows)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jpqbench", description="joint pruning + quantization benchmark harness")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="benchmark config (default: %(default)s)")
    # --config is accepted before or after the subcommand (`jpqbench run ... --config C`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="benchmark config (default: %s)" % DEFAULT_CONFIG)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    p = command("list", help="show registered methods, datasets, models or hardware cost models")
    p.add_argument("what", choices=["methods", "datasets", "models", "cost-models"])
    p.add_argument("-v", "--verbose", action="store_true",
                   help="methods: also each one's file and hyperparameters (default and description)")
    p.add_argument("--markdown", action="store_true",
                   help="methods only: print docs/methods.md, generated from the method docstrings and "
                        "hyperparameters (`jpqbench list methods --markdown > docs/methods.md`)")
    p.set_defaults(func=cmd_list)

    p = command("prepare", help="put a dataset on disk under the config's data_root")
    p.add_argument("--dataset", required=True)
    p.set_defaults(func=cmd_prepare)

    p = command("pretrain", help="train the shared FP32 checkpoint")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", help="model zoo name; needed when the config lists several for the dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="checkpoint path (default: results/checkpoints/<dataset>/<model>/s<seed>.pt)")
    p.set_defaults(func=cmd_pretrain)

    p = command("run", help="compress a model: one (method, dataset, model) at each budget and seed given")
    p.add_argument("--method", required=True, help="a registered name or a variant, e.g. 'noncomm[order=pq]'")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", help="model zoo name; needed when the config lists several for the dataset")
    p.add_argument("--budget", type=float, action="append",
                   help="target cost as a fraction of FP32, in (0, 1); repeat it to run several budgets in turn")
    p.add_argument("--budget-metric", choices=["bops", "size"], default="bops")
    p.add_argument("--seed", type=int, action="append",
                   help="seed (default 0); repeat it to run several seeds in turn, each from its own checkpoint")
    p.add_argument("--epochs", type=int, help="override the config's compression epochs")
    p.add_argument("--checkpoint", action="append",
                   help="FP32 checkpoint, one per --seed in the same order (default: the grid's checkpoint of "
                        "the seed; pretrained if absent)")
    p.add_argument("--out", help="run folder (default: results/runs/<dataset>/<model>/<method>/<budget>/s<seed>)")
    p.add_argument("--nproc", type=int, help="train data-parallel in N local processes (launches torchrun; "
                   "the recipe's batch_size is the global batch)")
    p.set_defaults(func=cmd_run)

    p = command("cost", help="MACs, BOPs, weight bits and parameter counts of a model (and plan)")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", help="dataset whose input shape and classes to use")
    p.add_argument("--input-shape", type=int, nargs="+", help="instead of --dataset, e.g. 3 224 224")
    p.add_argument("--num-classes", type=int, default=1000, help="with --input-shape (default: %(default)s)")
    p.add_argument("--w-bits", type=int, help="uniform weight bits")
    p.add_argument("--a-bits", type=int, help="uniform activation bits")
    p.add_argument("--plan", help="a plan.json written by `jpqbench run`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cost)

    p = command("init-tracking", help="create the MLflow store and experiment once")
    p.add_argument("--marker", help="file to write when done (for Snakemake)")
    p.set_defaults(func=cmd_init_tracking)

    p = command("aggregate", help="collect every run's metrics.json into one CSV")
    p.add_argument("--out", default="results/summary.csv")
    p.set_defaults(func=cmd_aggregate)

    p = command("report", help="execute the analysis notebook into an HTML report")
    p.add_argument("--summary", default="results/summary.csv")
    p.add_argument("--out", default="results/report")
    p.add_argument("--published", metavar="CSV",
                   help="published numbers shown beside ours, labelled 'as reported' (default: the table that "
                        "ships with jpqbench, jpqbench/pipeline/published.csv)")
    p.add_argument("--reference", metavar="METHOD",
                   help="the method every other one is compared with, seed by seed (default: prune_then_quantize)")
    p.set_defaults(func=cmd_report)

    p = command("export", help="(re)export a finished run's physically pruned, bit-packed artifact")
    p.add_argument("--run-dir", required=True, help="the run folder (holds metrics.json and model.pt)")
    p.set_defaults(func=cmd_export)

    p = command("estimate", help="jobs, epochs and images of the grid; device-hours given a measured throughput")
    p.add_argument("--throughput", help="JSON written by benchmarks/throughput.py: "
                                        '{"device": ..., "img_per_s": {"<dataset>/<model>": N, ...}}')
    p.add_argument("--img-per-s", action="append", metavar="DATASET/MODEL=N",
                   help="training images per second of a (dataset, model); repeat it; wins over --throughput")
    p.add_argument("--json", action="store_true")
    p.add_argument("--slurm-runtime", action="store_true",
                   help="also suggest each Snakemake rule's SLURM runtime: its longest job x 1.5, in minutes")
    p.set_defaults(func=cmd_estimate)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM as an exception: the run unwinds and records that it was interrupted."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command == "cost" and not (args.dataset or args.input_shape):
        print("error: cost needs --dataset or --input-shape\n  fix: e.g. --dataset digits", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        status = args.func(args)  # None, or a launched torchrun's exit status
    except UserError as error:
        print(f"error: {error.problem}\n  fix: {error.fix}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"error: the run diverged: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `jpqbench list methods -v | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail
        return 0
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
