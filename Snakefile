"""The benchmark grid as a Snakemake workflow: prepare -> pretrain -> compress -> aggregate -> report.

    snakemake --profile profiles/local                            # the embedded grid (config/config.yaml)
    snakemake --profile profiles/slurm --configfile config/paper.yaml

Every rule calls the `jpqbench` CLI and nothing else; the grid itself (which runs exist and
where they live) comes from jpqbench.pipeline.grid, the same definition `jpqbench aggregate`
reads back, so the workflow and the summary can never disagree about what the grid is.
"""
import os
import re
from pathlib import Path

import jpqbench

from jpqbench.pipeline.grid import REFERENCE_KEY, budget_from_key, grid
from jpqbench.base.budget import Budget
from jpqbench.base.method_spec import make_method
from jpqbench.base.config import load_config

# Training jobs pin torch's CPU threads to the job's `threads` (OMP_NUM_THREADS below): torch
# would otherwise start one thread per core in every parallel job, and oversubscribed cores
# made the grid ~1.7x slower on 2 cores.
# The default grid. `--configfile FILE` replaces it: the jobs are handed one file
# (`jpqbench ... --config FILE`), and Snakemake's own `config` would be FILE merged key by key
# into this default (a paper run would inherit the digits dataset), so the workflow reads and
# validates that one file itself instead.
configfile: "config/config.yaml"

if workflow.config_settings.config:
    raise WorkflowError("--config overrides reach Snakemake but not the `jpqbench` jobs, which read the "
                        "config file; put the change in a copy of the config and pass --configfile COPY")
if len(workflow.overwrite_configfiles) > 1:
    raise WorkflowError("pass one --configfile: the `jpqbench` jobs read exactly one config file")
CONFIG_FILE = os.path.relpath(workflow.overwrite_configfiles[0] if workflow.overwrite_configfiles
                              else "config/config.yaml")
# Shell commands use CONFIG_FILE directly rather than as an input or a param: which file holds
# the grid is no part of a run's provenance (a copied config must not re-run every job); the
# recipe and hyperparameters it holds are, and are params of the rules that use them.
# A bad key or an unregistered method/dataset/model stops the workflow here, naming the key.
cfg = load_config(CONFIG_FILE)
# the report's notebook and published numbers, wherever the jpqbench in use is installed
REPORT_FILES = Path(jpqbench.__file__).parent / "pipeline"

DATA = cfg.data_root
RESULTS = cfg.results_root
RUNS = f"{RESULTS}/runs"


def checkpoint_of(seed):
    """The FP32 checkpoint of ``seed`` (a number, or "{seed}" for the wildcard)."""
    return f"{RESULTS}/checkpoints/{{dataset}}/{{model}}/s{seed}.pt"


GRID = grid(cfg)
# metrics.json, written last, marks a finished run -- finished with results (status ok: then
# plan.json, model.pt and model.jpq, the real artifact exported inside the job's process, are
# beside it) or diverged (no results; the report lists it and the grid goes on). It is the one
# declared output, so a diverged run does not stop the workflow.
RUN_FILES = ["metrics.json"]


def budget_keys(dataset):
    """The run-folder names of ``dataset``'s budgets (a dataset may list its own budgets)."""
    return [Budget(cfg.budget_metric, target).key for target in cfg.budgets_of(dataset)]


# The run rules. With `batch_runs` (the default grid) one job runs every budget and seed of a
# (dataset, model, method) in one process, so process start-up (~8 s of torch and MLflow
# imports) and data loading are paid once per method rather than once per run; the budgets
# and seeds a job writes must then be fixed patterns in its outputs, and a dataset may have
# its own budgets and seeds, so there is one rule per dataset: compress_<dataset> for the
# methods that take a budget, reference_<dataset> for the budget-free fp32 reference.
# Without it (clusters, where a run takes hours) one job per run: rules `compress` (budget
# and seed wildcards) and `reference` (seed wildcard).
# Each entry: rule name -> (kind, dataset pattern, budget keys, seeds, the job's log/benchmark name).
if cfg.batch_runs:
    RUN_RULES = {}
    for _dataset in cfg.datasets:
        _seeds = [str(seed) for seed in cfg.seeds_of(_dataset)]
        RUN_RULES[f"compress_{_dataset}"] = ("compress", re.escape(_dataset), budget_keys(_dataset), _seeds,
                                            "{dataset}/{model}/{method}")
        RUN_RULES[f"reference_{_dataset}"] = ("reference", re.escape(_dataset), [REFERENCE_KEY], _seeds,
                                             "{dataset}/{model}/{method}")
else:
    RUN_RULES = {"compress": ("compress", r"[^/]+", ["{budgetkey}"], ["{seed}"],
                              "{dataset}/{model}/{method}/{budgetkey}/s{seed}"),
                 "reference": ("reference", r"[^/]+", [REFERENCE_KEY], ["{seed}"], "{dataset}/{model}/{method}/s{seed}")}

wildcard_constraints:
    dataset=r"[^/]+",
    model=r"[^/]+",
    method=r"[^/]+",
    budgetkey=r"(?:bops|size)-[^/]+",
    seed=r"\d+",


def run_files(keys, seeds):
    """The files of the runs of one job: RUN_FILES in the folder of each budget key and seed."""
    return [f"{RUNS}/{{dataset}}/{{model}}/{{method}}/{key}/s{seed}/{name}"
            for seed in seeds for key in keys for name in RUN_FILES]


def recipe_of(wildcards):
    """The (dataset, model)'s training recipe: a param, so a changed recipe re-runs the job."""
    return cfg.recipe(wildcards.dataset, wildcards.model).model_dump()


def budget_args(keys):
    """`--budget T ... --budget-metric M` for the job's budget keys ("" for the reference)."""
    def args(wildcards):
        budgets = [budget_from_key(key.format(budgetkey=getattr(wildcards, "budgetkey", ""))) for key in keys]
        if budgets == [None]:
            return ""
        return " ".join(f"--budget {budget.target!r}" for budget in budgets) + f" --budget-metric {cfg.budget_metric}"
    return args


def seed_args(seeds):
    """`--seed S --checkpoint CKPT ...`: the job's seeds, each with its own FP32 checkpoint (its inputs, in order)."""
    def args(wildcards, input):
        job_seeds = [seed.format(seed=getattr(wildcards, "seed", "")) for seed in seeds]
        return " ".join(f"--seed {seed} --checkpoint {checkpoint}" for seed, checkpoint in zip(job_seeds, input.checkpoints))
    return args


def hparams_of(wildcards):
    """The method's resolved hyperparameters for the job's (dataset, model): a param, so changing them re-runs the job."""
    return make_method(wildcards.method, cfg.method_params_of(wildcards.dataset, wildcards.model)).hp.model_dump()


# Tiny bookkeeping jobs run where snakemake runs, never through a cluster queue.
localrules: all, aggregate, report


rule all:
    input:
        f"{RESULTS}/report",


# MLflow's SQLite store races on its schema when parallel jobs create it: it is created here,
# before the first job starts (not in a dry run, nor in the jobs a cluster runs). A hook, not a
# rule whose output every training job needs: that output would be missing in a fresh clone,
# and Snakemake would then re-run every pretraining there, of checkpoints pulled with
# `dvc pull` too (docs/dvc.md).
onstart:
    shell("mkdir -p {RESULTS}/logs && jpqbench init-tracking --config {CONFIG_FILE} > {RESULTS}/logs/tracking.log 2>&1")


# The dataset's MANIFEST.json is written last, so it marks a complete `prepare`.
rule prepare:
    output:
        f"{DATA}/{{dataset}}/MANIFEST.json",
    log:
        f"{RESULTS}/logs/prepare/{{dataset}}.log",
    shell:
        "jpqbench prepare --dataset {wildcards.dataset} --config {CONFIG_FILE} > {log} 2>&1"


# One FP32 starting point per (dataset, seed), shared by every method. `ancient`: data prepared
# or pulled after the checkpoint does not make it stale (a run refuses a checkpoint pretrained on
# other data: its data fingerprint), so a checkpoint pulled with `dvc pull` is not trained again.
rule pretrain:
    input:
        manifest=ancient(f"{DATA}/{{dataset}}/MANIFEST.json"),
    output:
        checkpoint_of("{seed}"),
    params:
        recipe=recipe_of,
    log:
        f"{RESULTS}/logs/pretrain/{{dataset}}/{{model}}/s{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{dataset}}/{{model}}/s{{seed}}.tsv"
    threads: 1
    shell:
        "OMP_NUM_THREADS={threads} jpqbench pretrain --dataset {wildcards.dataset} --model {wildcards.model} --seed {wildcards.seed} "
        "--config {CONFIG_FILE} "
        "--out {output} > {log} 2>&1"


for rule_name, (kind, dataset_pattern, job_budget_keys, job_seeds, job_name) in RUN_RULES.items():
    rule:
        name: rule_name
        input:
            checkpoints=[checkpoint_of(seed) for seed in job_seeds],
        output:
            run_files(job_budget_keys, job_seeds),
        wildcard_constraints:
            dataset=dataset_pattern,
        params:
            budget=budget_args(job_budget_keys),
            seeds=seed_args(job_seeds),
            recipe=recipe_of,
            hparams=hparams_of,
        log:
            f"{RESULTS}/logs/{kind}/{job_name}.log",
        benchmark:
            f"{RESULTS}/benchmarks/{kind}/{job_name}.tsv"
        threads: 1
        shell:
            "OMP_NUM_THREADS={threads} jpqbench run --method {wildcards.method:q} --dataset {wildcards.dataset} --model {wildcards.model} "
            "{params.budget} {params.seeds} --config {CONFIG_FILE} > {log} 2>&1"


rule aggregate:
    input:
        [f"{point.run_dir(RUNS)}/metrics.json" for point in GRID],
    output:
        f"{RESULTS}/summary.csv",
    log:
        f"{RESULTS}/logs/aggregate.log",
    shell:
        "jpqbench aggregate --config {CONFIG_FILE} --out {output} > {log} 2>&1"


rule report:
    input:
        summary=f"{RESULTS}/summary.csv",
        notebook=REPORT_FILES / "report.ipynb",
        published=REPORT_FILES / "published.csv",
    output:
        report(directory(f"{RESULTS}/report"), patterns=["{name}.html", "{name}.png", "{name}.csv"],
               category="Benchmark report"),
    log:
        f"{RESULTS}/logs/report.log",
    shell:
        "jpqbench report --summary {input.summary} --published {input.published} --out {output} > {log} 2>&1"
