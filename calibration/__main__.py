"""python -m calibration run --device cpu|cuda [--quick] [--sizes 10M,50M] \
        [--families encoder,decoder] [--sections runtime,loads,inference,steps] \
        [--step-sizes 5M,20M] [--workdir DIR] --out PROFILE.json
python -m calibration validate PROFILE.json
python -m calibration merge A.json B.json --out C.json [--force]
python -m calibration testbed ARRIVALS.csv --plan PLAN.json --device cpu|cuda --out measured.json
"""
from __future__ import annotations

import argparse
import signal
import sys


def _csv(s: str) -> list:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> list:
    try:
        return [int(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m calibration",
                                 description="capsim calibration harness: times real model "
                                 "loads, runtime init and inference; writes a profile.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a calibration job and write a profile")
    r.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    r.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats (a few minutes on a CPU)")
    r.add_argument("--sizes", type=_csv, default=None,
                   help="model sizes for the load paths (and, capped, inference), "
                   "e.g. 10M,50M,1.3B")
    r.add_argument("--infer-sizes", type=_csv, default=None,
                   help="model sizes for inference (default: a subset of --sizes)")
    r.add_argument("--families", type=_csv, default=["encoder", "decoder"],
                   help="model families: encoder,decoder")
    r.add_argument("--load-family", default=None,
                   help="family whose files the load paths use (default: first family)")
    r.add_argument("--sections", type=_csv, default=["runtime", "loads", "inference", "steps"],
                   help="what to measure: runtime,loads,inference,steps")
    r.add_argument("--step-sizes", type=_csv, default=None,
                   help="sizes of the llama-like decoder whose step time is timed "
                   "(default 5M,20M quick on cpu, 5M,20M,50M full; 25M,100M / 125M,350M,1.3B on cuda)")
    r.add_argument("--concurrency", type=_ints, default=None,
                   help="concurrency levels (default 1,2 quick, 1,2,4 full)")
    r.add_argument("--runtime-repeats", type=int, default=None,
                   help="fresh-process runtime probes (default 3 quick, 5 full)")
    r.add_argument("--dtype", default=None,
                   help="weights dtype (default float32 on cpu, float16 on cuda)")
    r.add_argument("--load-threads", type=int, default=1,
                   help="torch intra-op threads while timing loads (0: torch default)")
    r.add_argument("--wait-budget", type=float, default=None,
                   help="seconds the job may spend waiting out other processes' CPU "
                   "bursts (default 40 quick, 600 full; 0: only flag contended samples, "
                   "never wait or re-measure)")
    r.add_argument("--workdir", default=None,
                   help="where temporary model files go (default: a hidden dir next to --out)")
    r.add_argument("--keep", action="store_true", help="keep the model files")
    r.add_argument("--no-resume", action="store_true",
                   help="ignore OUT.partial.json from an interrupted run")
    r.add_argument("--note", default=None, help="free text stored as metadata.note")
    r.add_argument("--out", required=True, help="profile JSON to write")
    v = sub.add_parser("validate", help="check a profile and print a summary")
    v.add_argument("profile")
    m = sub.add_parser("merge", help="merge two profiles of the same machine")
    m.add_argument("a")
    m.add_argument("b")
    m.add_argument("--out", required=True)
    m.add_argument("--force", action="store_true", help="merge even across hosts/devices")
    t = sub.add_parser("testbed", help="serve ARRIVALS.csv with real models as PLAN.json says; "
                       "record every request, load and unload")
    t.add_argument("arrivals", help="arrivals CSV (capsim trace SCENARIO --out arrivals.csv)")
    t.add_argument("--plan", required=True, help="PLAN.json (capsim.testbed-plan/1, written by capsim)")
    t.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    t.add_argument("--workdir", default=None, help="where the model files go (default: a temporary dir)")
    t.add_argument("--seed", type=int, default=0, help="the router's random seed")
    t.add_argument("--out", required=True, help="measured.json to write")
    return ap


def _testbed(args) -> int:
    from . import testbed

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
    try:
        res = testbed.run_testbed(args.arrivals, args.plan, args.out, device=args.device,
                                  workdir=args.workdir, seed=args.seed, log=log)
        log(f"testbed: {len(res['requests']['model']):,} requests, {len(res['loads'])} loads, "
            f"{len(res['unloads'])} unloads, {res['unfinished']} unfinished; wrote {args.out}")
        return 1 if res["unfinished"] else 0
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "testbed":
        return _testbed(args)
    from . import profile as prof
    if args.cmd == "validate":
        try:
            p = prof.load(args.profile)
        except (OSError, ValueError) as e:
            print(f"invalid: {e}", file=sys.stderr)
            return 1
        print(prof.summary(p))
        print("valid")
        return 0
    if args.cmd == "merge":
        try:
            p = prof.merge(prof.load(args.a), prof.load(args.b), force=args.force)
            prof.save(p, args.out)
        except (OSError, ValueError) as e:
            print(f"merge failed: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
        return 0

    from .run import Config, run

    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)
    # Ctrl-C must interrupt (and clean up) even where the parent shell started
    # us with SIGINT ignored (a background job of a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = Config(out=args.out, device=args.device, quick=args.quick, sizes=args.sizes,
                 infer_sizes=args.infer_sizes, families=args.families,
                 load_family=args.load_family, workdir=args.workdir, keep=args.keep,
                 dtype=args.dtype, concurrency=args.concurrency, sections=args.sections,
                 runtime_repeats=args.runtime_repeats,
                 resume=not args.no_resume, load_threads=args.load_threads,
                 wait_budget_s=args.wait_budget, note=args.note, step_sizes=args.step_sizes)
    try:
        p = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .run import partial_path
        print(f"interrupted; partial results in {partial_path(args.out)} "
              "(run again with the same --out to resume)", file=sys.stderr)
        return 130
    print(prof.summary(p))
    return 1 if any(e.get("kind") != "oom" for e in p.get("errors", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
