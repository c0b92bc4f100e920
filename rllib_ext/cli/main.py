"""The `rllib` command (Ray 2.60 ships none).

    rllib train file tuned_examples/ppo_cartpole.yaml --stop '{"training_iteration": 2}'
    rllib train --algo PPO --env CartPole-v1 --config '{"lr": 0.0003}'
    rllib list

Every user error ends in one paragraph naming the file, the key and the fix (exit code 2);
a failed trial ends with exit code 1 and the path of its error file.
"""

from __future__ import annotations

import argparse
import os
import sys

from rllib_ext.cli.errors import CLIError

EPILOG = """\
experiment files (classic RLlib tuned-example YAML):
  my-experiment:
    run: PPO                      # algorithm (`algo:` also works)
    env: CartPole-v1              # gymnasium id, rllib-ext env name, or module:Class
    stop: {training_iteration: 20}
    checkpoint_freq: 5            # optional; --checkpoint-freq overrides
    num_samples: 1                # optional; repeats every config point
    config:                       # AlgorithmConfig fields
      lr: {grid_search: [0.001, 0.0003]}    # sweep: one trial per value
      gamma: {choice: [0.95, 0.99]}         # random search (with num_samples)
      entropy_coeff: {uniform: [0.0, 0.01]} # also loguniform, randint

results: one directory per trial under STORAGE/EXPERIMENT/ with progress.csv, result.json,
tfevents files (view with `tensorboard --logdir STORAGE/EXPERIMENT`) and checkpoint_* dirs.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are CLIErrors: one paragraph like every other error."""

    def error(self, message):
        raise CLIError(f"{message}.", source="command line",
                       fix=f"see `{self.prog} --help`.")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser (for --help) and the `train` parser (parsed intermixed, so options
    may come before or after `file PATH`)."""
    parser = _Parser(
        prog="rllib", description="Train RLlib and rllib-ext algorithms through Ray Tune.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = commands.add_parser(
        "train", help="train from a YAML file (`train file PATH`) or from flags",
        prog="rllib train",
        description="Train from an experiment file (`rllib train file PATH.yaml [options]`) or "
                    "from flags (`rllib train --algo NAME --env ENV [options]`).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    train.add_argument("words", nargs="*", metavar="file PATH",
                       help="`file PATH.yaml`: the experiment file to run")
    train.add_argument("--algo", "--run", dest="algo",
                       help="algorithm name for a quick run without a file (e.g. PPO, VCPO, "
                            "TMFPG)")
    train.add_argument("--env", help="environment for a quick run (gymnasium id, rllib-ext env "
                                     "name, or module:Class)")
    train.add_argument("--config", metavar="JSON",
                       help="""JSON object deep-merged into the config, e.g. '{"lr": 1e-4}'""")
    train.add_argument("--stop", metavar="JSON",
                       help="""JSON object merged into the stop criteria, e.g. """
                            """'{"training_iteration": 2}'""")
    train.add_argument("--storage-path", metavar="DIR",
                       help="where experiment/trial directories go (default ~/ray_results)")
    train.add_argument("--checkpoint-freq", type=int, metavar="N",
                       help="checkpoint every N iterations (a final checkpoint is always kept)")
    train.add_argument("--restore", metavar="PATH",
                       help="resume from a checkpoint directory (or the newest checkpoint under "
                            "a trial/experiment directory); the iteration counter continues")
    train.add_argument("--num-samples", type=int, metavar="N",
                       help="repeat every config point N times (random search draws N points)")
    train.add_argument("--experiment", metavar="NAME",
                       help="run only this experiment of a multi-experiment file")
    train.add_argument("--name", help="experiment name for a quick run (default ALGO-ENV)")
    train.add_argument("--num-cpus", type=int, metavar="N",
                       help="CPUs for the local Ray instance (default: all)")
    train.add_argument("-v", "--verbose", action="count", default=0,
                       help="also show the output of vLLM, Ray workers and libraries (else only "
                            "in rllib.log in the trial directory) and Tune's status tables "
                            "(-v, -vv)")
    train.add_argument("--logger", action="append", choices=["wandb", "mlflow"], default=[],
                       help="also send metrics to Weights & Biases or MLflow (Ray Tune's "
                            "integrations; the package must be installed; repeatable)")
    train.add_argument("--dry-run", action="store_true",
                       help="validate the experiment(s) and print what would run; start nothing")

    commands.add_parser("list", help="list the algorithms and the environments each one takes")
    export = commands.add_parser(
        "export", help="write the model of an LLM run's checkpoint as a Hugging Face folder",
        prog="rllib export",
        description="Write the trained model of a checkpoint (of VCPO or another LLM algorithm) "
                    "with its tokenizer into a folder that transformers "
                    "(AutoModelForCausalLM.from_pretrained) and vLLM load.")
    export.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoint directory, or a trial/experiment directory (its "
                             "newest checkpoint)")
    export.add_argument("--to", required=True, metavar="DIR", help="the folder to write")
    export.add_argument("--module-id", default="default_policy",
                        help="the RLModule to export (default: default_policy)")
    return parser, train


def _experiments_from_args(args) -> list:
    from rllib_ext.cli.experiment import build_experiment, experiments_from_file, parse_json_option

    config_override = parse_json_option(args.config, "--config")
    stop_override = parse_json_option(args.stop, "--stop")
    for flag in ("checkpoint_freq", "num_samples"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            option = "--" + flag.replace("_", "-")
            raise CLIError(f"{option} must be >= 0, got {value}.", source="command line",
                           key=option, fix=f"pass e.g. {option} 1.")
    if args.words:
        if args.words[0] != "file" or len(args.words) != 2:
            raise CLIError(f"unexpected arguments: {' '.join(args.words)}.",
                           source="command line",
                           fix="use `rllib train file PATH.yaml [options]` or "
                               "`rllib train --algo NAME --env ENV [options]`.")
        if args.algo or args.env:
            raise CLIError("--algo/--env cannot be combined with `file PATH`.",
                           source="command line",
                           fix="put the algorithm and env in the YAML (or use --config to "
                               "override its values).")
        return experiments_from_file(args.words[1], config_override=config_override,
                                     stop_override=stop_override, only=args.experiment)
    if not args.algo or not args.env:
        raise CLIError("nothing to train.", source="command line",
                       fix="give an experiment file (`rllib train file PATH.yaml`) or both "
                           "--algo NAME and --env ENV.")
    name = args.name or f"{args.algo}-{args.env}".replace(":", "_").replace("/", "_")
    spec = {"run": args.algo, "env": args.env, "config": config_override, "stop": stop_override}
    return [build_experiment(name, spec, "command line")]


def _train(args) -> int:
    from rllib_ext.cli.loggers import check_loggers

    check_loggers(args.logger)
    experiments = _experiments_from_args(args)
    from rllib_ext.cli.run_log import RunLog
    from rllib_ext.cli.tune_runner import find_checkpoint

    restore = find_checkpoint(args.restore) if args.restore else None
    if args.dry_run:
        for experiment in experiments:
            print(f"{experiment.name}: {experiment.algo_name} on "
                  f"{experiment.param_space.get('env')}, stop {experiment.stop or 'never'}, "
                  f"{len(experiment.param_space)} config keys ({experiment.source}): valid")
            for note in experiment.notes:
                print(f"   note: {note}")
        return 0
    run_log = RunLog(args.verbose)
    try:
        return _run_experiments(experiments, args, restore, run_log)
    finally:
        run_log.close()


def _run_experiments(experiments, args, restore, run_log) -> int:
    from rllib_ext.cli.tune_runner import init_ray, run_experiment

    init_ray(run_log, args.num_cpus)
    failed = 0
    for experiment in experiments:
        print(f"== {experiment.name}: {experiment.algo_name} on "
              f"{experiment.param_space.get('env')} ({experiment.source})", flush=True)
        for note in experiment.notes:
            print(f"   note: {note}", flush=True)
        if restore:
            print(f"   restoring from {restore}", flush=True)
        outcomes = run_experiment(
            experiment, run_log, storage_path=args.storage_path,
            checkpoint_freq=args.checkpoint_freq, restore=restore, num_samples=args.num_samples,
            loggers=tuple(args.logger))
        for outcome in outcomes:
            print(f"   trial {outcome.name}: {outcome.status} after {outcome.iterations} "
                  f"iterations; dir {outcome.trial_dir}", flush=True)
            if outcome.checkpoint:
                print(f"   checkpoint: {outcome.checkpoint}", flush=True)
            if outcome.error_file:
                print(f"   error: see {outcome.error_file}", flush=True)
                failed += 1
        if outcomes:
            print(f"   tensorboard --logdir {os.path.dirname(outcomes[0].trial_dir)}", flush=True)
    print(f"   full log (vLLM, Ray workers; -v shows it here): {', '.join(run_log.paths())}",
          flush=True)
    return 1 if failed else 0


def _list() -> int:
    from rllib_ext import registry
    from rllib_ext.cli.env_kinds import ENV_KINDS, PROJECT_ALGORITHM_ENV_KINDS, envs_for

    rllib = [n for n in registry.known_algorithm_names() if n not in registry.PROJECT_ALGORITHMS]
    rows = [(name, PROJECT_ALGORITHM_ENV_KINDS.get(name, "rllib"))
            for name in sorted(registry.PROJECT_ALGORITHMS)]
    rows.append((", ".join(rllib) + " (RLlib)", "rllib"))
    for names, kind in rows:
        print(f"{names}\n    takes {ENV_KINDS[kind].description}: {envs_for(kind)}")
    return 0


def _export(args) -> int:
    from rllib_ext.cli.tune_runner import find_checkpoint
    from rllib_ext.llm.export import export_model

    checkpoint = find_checkpoint(args.checkpoint, flag="CHECKPOINT")
    try:
        target = export_model(checkpoint, args.to, module_id=args.module_id)
    except (FileNotFoundError, TypeError) as e:
        raise CLIError(str(e).split(" Fix: ")[0], source=checkpoint, key="CHECKPOINT",
                       fix=str(e).split(" Fix: ")[1] if " Fix: " in str(e) else None) from None
    print(f"exported {checkpoint} -> {target} (load it with "
          f"AutoModelForCausalLM.from_pretrained('{target}') or vllm.LLM('{target}'))")
    return 0


def _save_traceback() -> str:
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="rllib-error-", suffix=".txt",
                                     delete=False) as f:
        traceback.print_exc(file=f)
        return f.name


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Like `python -m`: modules named in experiment files (reward functions, env and algorithm
    # classes) import from the directory the command runs in, here and (through PYTHONPATH,
    # which the Ray workers started later inherit) in every worker.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if os.getcwd() not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *filter(None, paths)])
    parser, train_parser = build_parser()
    try:
        if argv[:1] == ["train"]:
            return _train(train_parser.parse_intermixed_args(argv[1:]))
        args = parser.parse_args(argv)
        if args.command == "list":
            return _list()
        if args.command == "export":
            return _export(args)
        parser.print_help()
        return 2
    except CLIError as e:
        print(f"rllib: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rllib: interrupted; finished checkpoints stay in the trial directories.",
              file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one paragraph for the user, the trace in a file
        trace = _save_traceback()
        print(f"rllib: internal error: {type(e).__name__}: {e}. This is a bug in rllib-ext, "
              f"not in your input; the traceback is in {trace}. Fix: please report it with "
              "that file.", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
