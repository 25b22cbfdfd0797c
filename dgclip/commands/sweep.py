"""`dgclip sweep launch | delete_incomplete | list`: DomainBed-style grids (dgclip.sweep)."""
from __future__ import annotations

from ..presets.apply import add_preset_flag
from ..cli_flags import METHODS, HelpFormatter, add_flags, int_at_least, json_object, reject

FLAGS = ("root", "backbone", "pretrained", "cache-dir", "steps", "eval-every", "holdout-fraction", "train-domains",
         "device", "precision", "no-progress", "workers", "feature-cache-budget-gb", "skip-unreadable")


def add_parser(subparsers):
    p = subparsers.add_parser("sweep", help="DomainBed-style grid: launch | delete_incomplete | list",
                              formatter_class=HelpFormatter,
                              description="One job per (method, dataset, test domain(s), hparam seed, trial seed), "
                                          "each in its own folder under --sweep-dir. `launch` checks every image "
                                          "the grid reads first, then runs the jobs not done (interrupted ones "
                                          "resume from their checkpoint).")
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
    reject(p, "--selection", "`dgclip results SWEEP_DIR` reports both DomainBed selections (training-domain and oracle)")
    reject(p, "--hparams-seed", "use --n-hparams and --hparams-seed-start")
    reject(p, "--resume", "`sweep launch` always resumes incomplete jobs and skips done ones")
    return p


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
    if args.preset:
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
    check_images(jobs, args)
    ensure_pretrained(args)
    before = {k: s for s, k in list_jobs(jobs)}
    after = launch(jobs, args.launcher, **options)
    ran = sum(1 for k in after if before[k] != "done")
    print(f"{sum(1 for s in after.values() if s == 'done')}/{len(jobs)} jobs done ({ran} launched now, "
          f"{len(jobs) - ran} already done); results: dgclip results {args.sweep_dir}")
    return 0 if all(s == "done" for s in after.values()) else 1
