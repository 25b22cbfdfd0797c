"""`dgclip sweep launch | delete_incomplete | list`: DomainBed-style grids (dgclip.sweep)."""
from __future__ import annotations

from ..presets.apply import add_preset_flag
from ..protocols import cli as protocols_cli
from ..cli_flags import METHODS, HelpFormatter, add_flags, int_at_least, json_object, reject

FLAGS = ("root", "backbone", "pretrained", "cache-dir", "steps", "eval-every", "holdout-fraction", "train-domains",
         "device", "precision", "no-progress", "workers", "feature-cache-budget-gb", "skip-unreadable")


def add_parser(subparsers):
    p = subparsers.add_parser("sweep", help="DomainBed-style grid or CoOp-suite grid: launch | delete_incomplete | list",
                              formatter_class=HelpFormatter,
                              description="One job per (method, dataset, test domain(s), hparam seed, trial seed), "
                                          "each in its own folder under --sweep-dir. `launch` checks every image "
                                          "the grid reads first, then runs the jobs not done (interrupted ones "
                                          "resume from their checkpoint). With a CoOp-suite --protocol: one job "
                                          "per (method, dataset, trial seed), trial t running CoOp's seed t+1 "
                                          "(the preset's seeds), each as `dgclip train --protocol` runs it.")
    p.add_argument("action", choices=["launch", "delete_incomplete", "list"])
    p.add_argument("--sweep-dir", required=True, help="one folder per job, plus sweep.json")
    p.add_argument("--methods", nargs="+", required=True, help="of: " + ", ".join(METHODS))
    p.add_argument("--datasets", nargs="+", required=True, help="registered names, DomainBed-layout folders or "
                                                                "open-set split files")
    p.add_argument("--test-domains", nargs="+", default=["all"], help="domains (or 'a,b' groups); 'all' = each in turn")
    p.add_argument("--n-hparams", type=int_at_least(1), default=1,
                   help="hparam seeds per cell (the first is --hparams-seed-start; 0 = the method's defaults)")
    p.add_argument("--hparams-seed-start", type=int_at_least(0), default=0)
    p.add_argument("--n-trials", type=int_at_least(1), default=1, help="trial seeds (data splits) per cell")
    p.add_argument("--hparams", type=json_object, default=None,
                   help="JSON overrides: {name: value} or {method: {name: value}}")
    p.add_argument("--launcher", choices=["local", "multi_gpu", "submitit"], default="local")
    p.add_argument("--submitit-cluster", default=None, help="None = auto (SLURM when present), 'local' or 'debug'")
    p.add_argument("--submitit-options", type=json_object, default=None,
                   help='JSON executor parameters, e.g. {"slurm_partition": "gpu", "gpus_per_node": 1, '
                        '"timeout_min": 600}')
    add_flags(p, FLAGS)
    add_preset_flag(p)
    reject(p, "--seeds", "a sweep's trial seeds are 0..N-1 with --n-trials N")
    reject(p, "--output-dir", "a sweep writes each job under --sweep-dir")
    reject(p, "--selection", "`dgclip results SWEEP_DIR` reports both DomainBed selections (training-domain and "
                             "oracle); CoOp-suite sweeps report the last epoch")
    reject(p, "--hparams-seed", "use --n-hparams and --hparams-seed-start")
    reject(p, "--resume", "`sweep launch` always resumes incomplete jobs and skips done ones")
    protocols_cli.add_train_arguments(p)  # --protocol, --shots, --epochs, --targets (the CoOp suite)
    return p


# dest -> (flag, why): flags that have no meaning under a CoOp-suite --protocol
SUITE_REFUSED = {
    "test_domains": ("--test-domains", "the protocol fixes what is tested (cross-dataset / imagenet-shift: --targets)"),
    "train_domains": ("--train-domains", "the protocol trains on the dataset's few-shot train split"),
    "holdout_fraction": ("--holdout-fraction", "the suite's val split comes from the dataset's split file"),
    "steps": ("--steps", "the suite counts epochs: use --epochs"),
    "eval_every": ("--eval-every", "the suite reports the last epoch; nothing is evaluated during training"),
    "hparams_seed_start": ("--hparams-seed-start", "suite runs use the preset's hyper-parameters (--hparams overrides them)"),
    "feature_cache_budget_gb": ("--feature-cache-budget-gb", "the suite's runner caches its frozen features itself"),
    "skip_unreadable": ("--skip-unreadable", "a suite dataset's split file names every image: a missing one is an error"),
    "preset": ("--preset", "a suite protocol always uses its paper configuration (dgclip/presets/coop_suite.py), "
                           "overridden by --shots/--epochs and --hparams"),
}
# dest -> flag: flags that only mean something under a CoOp-suite --protocol
LOO_REFUSED = {"shots": "--shots", "epochs": "--epochs", "targets": "--targets"}


def refused_flag(args) -> str:
    """The error for a flag given where it does not apply (empty when every flag applies)."""
    from ..presets.apply import explicit_dests

    typed = explicit_dests(args._argv) if getattr(args, "_argv", None) is not None else set()
    if args.protocol != "loo":
        for dest, (flag, why) in SUITE_REFUSED.items():
            if dest in typed:
                return f"argument {flag}: does not apply to --protocol {args.protocol}; {why}"
        if args.n_hparams > 1:
            return (f"argument --n-hparams: does not apply to --protocol {args.protocol} (got {args.n_hparams}); "
                    "suite runs use the preset's hyper-parameters: one per cell")
        return ""
    for dest, flag in LOO_REFUSED.items():
        if dest in typed:
            return (f"argument {flag}: applies to the CoOp-suite protocols (--protocol few-shot, base2new, "
                    "cross-dataset, imagenet-shift), not to leave-one-domain-out sweeps")
    return ""


def _suite_jobs(args):
    import argparse

    from ..protocols.sweep import make_suite_grid

    ns = argparse.Namespace(**{**vars(args), "output_dir": ""})  # each job's folder is set by the job
    cfg = protocols_cli.config_from_args(ns, args.methods[0], seed=0, dataset=args.datasets[0])
    return make_suite_grid(args.sweep_dir, args.methods, args.datasets, args.protocol, args.n_trials,
                           vars(cfg), hparams=args.hparams or {})


def _jobs(args):
    from ..sweep import make_grid

    train = {"root": args.root, "backbone": args.backbone, "pretrained": args.pretrained, "cache_dir": args.cache_dir,
             "eval_every": args.eval_every, "holdout_fraction": args.holdout_fraction, "device": args.device,
             "precision": args.precision, "progress": not args.no_progress, "workers": args.workers,
             "feature_cache_budget_gb": args.feature_cache_budget_gb, "train_domains": args.train_domains,
             "skip_unreadable": args.skip_unreadable}
    return make_grid(args.sweep_dir, args.methods, args.datasets, args.test_domains, args.n_hparams, args.n_trials,
                     steps=args.steps, hparams=args.hparams or {}, hparams_seed_start=args.hparams_seed_start, **train)


def check_images(jobs, args) -> None:
    """Every image the grid reads, decoded before the first job starts; a job marked done on data
    that has changed since is refused, as `--resume` is."""
    from ..data.catalog import get_spec
    from ..data.domainbed import DataError
    from ..engine import read_records
    from ..run_guard import data_identity_diff
    from ..sweep import job_status
    from ._training import check_images_first, read_domains

    identity = check_images_first([(j.dataset, j.test_domains, args.train_domains) for j in jobs], args.root,
                                  args.cache_dir, args.skip_unreadable)
    for job in jobs:
        done = read_records(job.folder / "results.jsonl") if job_status(job) == "done" else []
        if not done:
            continue
        read = read_domains(get_spec(job.dataset), job.test_domains, args.train_domains)
        diff = data_identity_diff(done[-1], identity[(job.dataset, read)])
        if diff:
            raise DataError(f"sweep job {job.key} is done on other data: {'; '.join(diff)}; "
                            "use a new --sweep-dir (or remove that job's folder to rerun it)")


def run(args) -> int:
    from ..sweep import delete_incomplete, launch, list_jobs
    from ._training import ensure_pretrained, finish_args

    finish_args(args)
    why = refused_flag(args)
    if why:
        print(f"dgclip sweep: error: {why}", file=__import__("sys").stderr)
        return 2
    suite = protocols_cli.is_suite_run(args)
    if suite:
        jobs = _suite_jobs(args)
    elif args.preset:
        from ..presets.apply import preset_sweep_jobs

        jobs = preset_sweep_jobs(args, args._argv)
    else:
        jobs = _jobs(args)
    if args.action == "list":
        rows = list_jobs(jobs)
        for status, key in rows:
            print(f"{status:13s} {key}")
        counts = {s: sum(1 for r in rows if r[0] == s) for s in ("done", "incomplete", "not launched")}
        print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({len(rows)} jobs)")
        return 0
    if args.action == "delete_incomplete":
        removed = delete_incomplete(jobs)
        print(f"deleted {len(removed)} incomplete job(s)" + "".join(f"\n  {k}" for k in removed))
        return 0
    options = {}
    if args.launcher == "submitit":
        options = {"cluster": args.submitit_cluster, **(args.submitit_options or {})}
    elif args.submitit_cluster is not None or args.submitit_options is not None:
        print("dgclip sweep: error: argument --submitit-cluster/--submitit-options: only apply with "
              "--launcher submitit", file=__import__("sys").stderr)
        return 2
    run_one = None
    if suite:  # a suite dataset's loader checks every image it names when the job builds it
        from ..protocols.embedded import EMBEDDED_SUITE
        from ..protocols.sweep import run_suite_job

        run_one = run_suite_job
        if EMBEDDED_SUITE in args.datasets:
            ensure_pretrained(args)  # the tiny CLIP's weights, pretrained once (as `train --protocol`)
    else:
        check_images(jobs, args)
        ensure_pretrained(args)
    before = {k: s for s, k in list_jobs(jobs)}
    after = launch(jobs, args.launcher, run=run_one, **options)
    ran = sum(1 for k in after if before[k] != "done")
    print(f"{sum(1 for s in after.values() if s == 'done')}/{len(jobs)} jobs done ({ran} launched now, "
          f"{len(jobs) - ran} already done); results: dgclip results {args.sweep_dir}")
    return 0 if all(s == "done" for s in after.values()) else 1
