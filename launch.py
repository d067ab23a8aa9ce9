r"""Runs an experiment: train (default; resumes from the workdir's checkpoint), eval, sample,
translate, export (the parameters as a NumPy .npz archive, or a BERT run as a Hugging Face
checkpoint), import (a Hugging Face BERT checkpoint as a run), or a sweep and its summary.

    python launch.py --config experiments/charlm.py --workdir runs/charlm
    python launch.py --config experiments/charlm.py:cell=gru --workdir runs/gru --config.opt.lr=1e-3
    python launch.py --config experiments/charlm.py --workdir runs/charlm --mode eval
    python launch.py --config experiments/charlm.py --workdir runs/charlm --mode sample \
        --prefix "the time machine" --length 200 --temperature 0.8
    python launch.py --config experiments/charlm.py --workdir runs/cells --sweep --parallel 2
    python launch.py --config experiments/charlm.py --workdir runs/cells --mode summarize
    python launch.py --config experiments/translate.py --workdir runs/translate --mode translate \
        --text "he is calm ." --beam_size 4
    python launch.py --config experiments/charlm.py --workdir runs/charlm --mode export \
        --out params.npz
    python launch.py --config experiments/charlm.py --workdir runs/charlm --profile_steps=10,20
    python launch.py --config experiments/bert_pretrain.py --workdir runs/bert --mode prepare \
        --source corpus.txt.gz --out shards/bert
    python launch.py --config experiments/bert_pretrain.py --workdir runs/hf_bert --mode import \
        --source path/to/bert-base-uncased
    python launch.py --config experiments/bert_pretrain.py --workdir runs/bert --mode export \
        --format hf --out exported/bert
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/X.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the saved config.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "translate", "export", "summarize",
                                    "prepare", "import"], "What to do.")
flags.DEFINE_bool("sweep", False, "Train every point of the config file's get_sweep().")
flags.DEFINE_integer("parallel", 1, "--sweep: how many points train at once, each in its own "
                     "process (1: one after another in this process).", lower_bound=1)
flags.DEFINE_integer("sweep_point", None, "--sweep: train only this point (how --parallel "
                     "starts its worker processes).")
flags.DEFINE_string("metric", "best_val_loss", "--sweep / --mode summarize: the result that "
                    "sorts the summary (lowest first; highest for accuracy and BLEU) and whose "
                    "curves summary.png shows.")
flags.DEFINE_integer("step", None, "eval/sample: the checkpoint step (default: the latest).")
flags.DEFINE_bool("best", False, "eval/sample: use the checkpoint with the best validation loss.")
flags.DEFINE_string("prefix", None, "sample: the text to continue (default: config.sample.prefix).")
flags.DEFINE_integer("length", None, "sample: number of tokens to generate.")
flags.DEFINE_float("temperature", None, "sample: softmax temperature; 0 is greedy.")
flags.DEFINE_integer("seed", 0, "sample: random seed.")
flags.DEFINE_string("text", None, "translate: a sentence to translate.")
flags.DEFINE_string("input_file", None, "translate: a file of sentences, one per line.")
flags.DEFINE_integer("beam_size", None, "translate: beam size; 1 is greedy "
                     "(default: config.decode.beam_size).")
flags.DEFINE_string("out", None, "export: the .npz file to write the parameters to (--format "
                    "hf: the directory); prepare: the directory of shards to write "
                    "(config.data.shard_dir of the runs).")
flags.DEFINE_enum("format", "npz", ["npz", "hf"], "export: one .npz of the parameter tree, or "
                  "a Hugging Face BERT checkpoint directory (config.json, model.safetensors, "
                  "tokenizer.json) that transformers.BertModel.from_pretrained loads.")
flags.DEFINE_list("source", [], "prepare: the text files (plain or .gz, WikiText's layout) to "
                  "tokenize into shards, comma-separated; import: the directory of a Hugging "
                  "Face BERT checkpoint (config.json, model.safetensors, and tokenizer.json "
                  "or vocab.txt).")
flags.DEFINE_string("profile_steps", None, "train: a jax.profiler trace of steps A to B "
                    "(--profile_steps=A,B, counted from 1) in WORKDIR/profile, which "
                    "`tensorboard --logdir WORKDIR/profile` shows in its profile tab.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0, with "
                    "--num_processes and --process_id; the same command runs on every host.")
flags.DEFINE_integer("num_processes", None, "Multi-host: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 to N-1.")
flags.DEFINE_bool("distributed", False, "Multi-host with the cluster's own settings: "
                  "jax.distributed.initialize() detects them on SLURM and Cloud TPU.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS
# The exit code of a run stopped by SIGTERM after saving (EX_TEMPFAIL of sysexits.h): a
# scheduler may requeue the job, and the same command resumes it.
STOPPED = 75


def _which() -> str:
    return "best" if FLAGS.best else "latest"


def _print_results(results: dict):
    for key, value in results.items():
        if key != "sample":
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if "sample" in results:
        print(f"sample: {results['sample']}")


def _experiment():
    from seqjax import config as config_lib
    return config_lib.load_experiment(FLAGS["config"].config_filename.split(":")[0])


def _sweep_points(config) -> list[dict]:
    from seqjax import sweep
    module = _experiment()
    if not hasattr(module, "get_sweep"):
        raise app.UsageError(f"{FLAGS['config'].config_filename} defines no get_sweep()")
    return sweep.check_points(module.get_sweep(), config)


def _worker_command(i: int) -> list[str]:
    """This command line for point i alone: the same config file and overrides."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--parallel"):
            skip = arg == "--parallel"
            continue
        args.append(arg)
    return [sys.executable, os.path.abspath(__file__), *args, f"--sweep_point={i}"]


def _summarize(points) -> list[dict]:
    """summary.md of the points (and the experiment's own summary, if it has one:
    `summarize_sweep(rows, workdir) -> the name of its table`), printed."""
    from seqjax import files, sweep
    rows = sweep.summarize(points, FLAGS.workdir, FLAGS.metric)
    tables = ["summary.md"]
    module = _experiment()
    if hasattr(module, "summarize_sweep"):
        tables.append(module.summarize_sweep(rows, FLAGS.workdir))
    for table in tables:
        print(files.read_text(os.path.join(FLAGS.workdir, table)), end="")
    return rows


def _sentences() -> list[str]:
    """--text, or the non-blank lines of --input_file (a local path or a URL)."""
    from seqjax import files
    if (FLAGS.text is None) == (FLAGS.input_file is None):
        raise ValueError("--mode translate needs exactly one of --text and --input_file")
    if FLAGS.beam_size is not None and FLAGS.beam_size < 1:
        raise ValueError(f"--beam_size={FLAGS.beam_size}: must be >= 1")
    if FLAGS.text is not None:
        return [FLAGS.text]
    if files.is_dir(FLAGS.input_file):
        raise ValueError(f"--input_file {FLAGS.input_file!r} is a directory")
    try:
        lines = files.read_text(FLAGS.input_file).splitlines()
        sentences = [line.strip() for line in lines if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"--input_file {FLAGS.input_file!r} is not UTF-8 text ({e.reason} at "
                         f"byte {e.start})") from None
    if not sentences:
        raise ValueError(f"--input_file {FLAGS.input_file!r} holds no sentence")
    return sentences


# ---------------------------------------------------------------------------------------------
# Modes: each a function of the config that returns the exit code.
# ---------------------------------------------------------------------------------------------

def _profile_steps(mode: str, config):
    """(A, B) of --profile_steps, or None; a ValueError where it does not apply."""
    from seqjax import analysis, profiling
    if FLAGS.profile_steps is None:
        return None
    if mode != "train" or config.task in analysis.ANALYSES:
        raise ValueError("--profile_steps traces the steps of a training run: the default "
                         "mode, without --sweep, of a task that trains")
    return profiling.parse_steps(FLAGS.profile_steps)


def train_mode(config) -> int:
    import jax

    from seqjax import analysis
    from seqjax.train.loop import train_and_evaluate
    if config.task in analysis.ANALYSES:
        results = analysis.run(config, FLAGS.workdir)
    else:
        results = train_and_evaluate(config, FLAGS.workdir,
                                     profile_steps=_profile_steps("train", config))
    if jax.process_index() == 0:
        _print_results(results)
    return STOPPED if results.get("stopped") else 0


def eval_mode(config) -> int:
    from seqjax.train import saved_runs
    _print_results(saved_runs.evaluate(config, FLAGS.workdir, step=FLAGS.step, which=_which()))
    return 0


def sample_mode(config) -> int:
    from seqjax.train import saved_runs
    options = {k: v for k in ("prefix", "length", "temperature")
               if (v := getattr(FLAGS, k)) is not None}
    print(saved_runs.generate(FLAGS.workdir, step=FLAGS.step, which=_which(), seed=FLAGS.seed,
                              defaults=config, **options))
    return 0


def translate_mode(config) -> int:
    """Prints one line per sentence: its translation, or an empty line where the sentence
    cannot be translated (reported on stderr; the exit code is then 1)."""
    from seqjax.train import saved_runs
    options = {} if FLAGS.beam_size is None else {"beam_size": FLAGS.beam_size}
    sentences = _sentences()
    problems = []
    translations = saved_runs.translate(FLAGS.workdir, sentences, step=FLAGS.step,
                                        which=_which(), defaults=config,
                                        on_error=problems.append, **options)
    print("\n".join(t or "" for t in translations))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def export_mode(config) -> int:
    from seqjax import files
    from seqjax.train import saved_runs
    if FLAGS.format == "hf":
        from seqjax import transfer
        if not FLAGS.out:
            raise ValueError("--mode export --format hf needs --out DIR")
        shapes = transfer.export_checkpoint(FLAGS.workdir, FLAGS.out, step=FLAGS.step,
                                            which=_which(), defaults=config)
        print(f"wrote {len(shapes)} arrays in Hugging Face's BERT layout to {FLAGS.out}")
        return 0
    if not FLAGS.out:
        raise ValueError("--mode export needs --out FILE.npz")
    if files.is_dir(FLAGS.out):
        raise ValueError(f"--out {FLAGS.out!r} is a directory; give the .npz file to write")
    shapes = saved_runs.export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, which=_which())
    print(f"wrote {len(shapes)} parameters to {FLAGS.out}")
    return 0


def summarize_mode(config) -> int:
    from seqjax import files
    if not files.is_dir(FLAGS.workdir):
        raise FileNotFoundError(f"--mode summarize: no sweep in {FLAGS.workdir!r}")
    _summarize(_sweep_points(config))
    return 0


def sweep_mode(config) -> int:
    """--sweep: the config file's get_sweep() points (seqjax.sweep), then their summary."""
    import jax

    from seqjax import sweep
    points = _sweep_points(config)
    if FLAGS.sweep_point is not None:  # a worker of a parallel sweep
        if not 0 <= FLAGS.sweep_point < len(points):
            raise app.UsageError(f"--sweep_point={FLAGS.sweep_point}: get_sweep() has "
                                 f"{len(points)} points")
        row = sweep.run_point(config, points[FLAGS.sweep_point], FLAGS.workdir)
        return {"ok": 0, "stopped": STOPPED}.get(row["status"], 1)
    if FLAGS.parallel > 1 and jax.process_count() > 1:
        raise app.UsageError("--parallel runs points as local processes: not with multi-host")
    stopped = sweep.run(config, points, FLAGS.workdir, parallel=FLAGS.parallel,
                        command=_worker_command)
    if stopped:
        print("sweep stopped; run the same command again to resume it")
    if jax.process_index() != 0:
        return STOPPED if stopped else 0
    rows = _summarize(points)
    if stopped:
        return STOPPED
    return 1 if any(row["status"].startswith("failed") for row in rows) else 0


def prepare_mode(config) -> int:
    from seqjax import tasks
    if FLAGS.out is None:
        raise ValueError("--mode prepare needs --out, the directory to write the shards into")
    manifest = tasks.prepare(config, FLAGS.workdir, FLAGS.source, FLAGS.out)
    print(f"wrote {manifest['rows']:,} training rows in {len(manifest['shards'])} shards to "
          f"{FLAGS.out}; train on them with --config.data.shard_dir={FLAGS.out}")
    return 0


def import_mode(config) -> int:
    from seqjax import transfer
    if len(FLAGS.source) != 1:
        raise ValueError("--mode import needs --source DIR, one Hugging Face BERT checkpoint")
    report = transfer.import_checkpoint(config, FLAGS.source[0], FLAGS.workdir)
    fresh = (f"; {', '.join(report['fresh'])} freshly initialised (not in the checkpoint)"
             if report["fresh"] else "")
    print(f"imported {report['arrays']} arrays and a vocabulary of {report['vocab_size']:,} "
          f"into {FLAGS.workdir}{fresh}; fine-tune with --config.init_from={FLAGS.workdir}")
    return 0


MODES = {"train": train_mode, "eval": eval_mode, "sample": sample_mode,
         "translate": translate_mode, "export": export_mode, "summarize": summarize_mode,
         "sweep": sweep_mode, "prepare": prepare_mode, "import": import_mode}


def _init_distributed():
    """jax.distributed.initialize before anything else touches the devices, when asked to:
    explicitly (--coordinator_address, --num_processes, --process_id) or with --distributed.
    On CPU the processes' collectives go through gloo."""
    explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
    if not FLAGS.distributed and all(v is None for v in explicit):
        return
    if not FLAGS.distributed and any(v is None for v in explicit):
        raise app.UsageError("multi-host needs all of --coordinator_address, --num_processes "
                             "and --process_id (or --distributed on SLURM / Cloud TPU)")
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if FLAGS.distributed:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    _init_distributed()
    from seqjax import analysis
    from seqjax.train.checkpoint import CheckpointError
    mode = "sweep" if FLAGS.sweep else FLAGS.mode
    try:
        from seqjax.train.checks import check_workdir
        config = FLAGS.config
        check_workdir(FLAGS.workdir)
        if mode in ("train", "sweep") and (FLAGS.step is not None or FLAGS.best):
            raise ValueError("--step and --best choose the checkpoint of eval, sample, "
                             "translate and export; training resumes from the latest one")
        if config.task in analysis.ANALYSES and mode != "train":
            raise ValueError(f"{config.task} is an analysis: it runs in the default mode only")
        _profile_steps(mode, config)
        return MODES[mode](config)
    except CheckpointError as e:
        # orbax's threads may still wait on the failed write: exit now, not at their leisure.
        print(f"error: {e}; the checkpoints written before it are kept", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _config_file(argv) -> str | None:
    """The path of the --config file (without its `:arg`)."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
    return None


def _check_config_file(argv):
    """The --config file must be an existing Python file."""
    path = _config_file(argv)
    if path is not None and not os.path.exists(path):
        return f"--config {path}: no such file"
    if path is not None and (not os.path.isfile(path) or not path.endswith(".py")):
        return f"--config {path}: not an experiment file (experiments/X.py)"
    return None


def _parse_flags(argv):
    """absl's parser, with a bad config file or an unknown `--config.x` field reported in one
    line, not a traceback."""
    problem = _check_config_file(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # an error inside get_config(arg)
            lines = [lines[0], lines[-1]]
        print("error: " + "\n".join(lines), file=sys.stderr)
    except (AttributeError, KeyError) as e:
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        reason = " ".join(str(e.args[0] if e.args else e).split())
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        if "has no attribute 'get_config'" in reason:
            print(f"error: --config {_config_file(argv)} defines no get_config(arg)",
                  file=sys.stderr)
        else:
            print(f"error: unknown config field in {' '.join(bad)}: {reason}", file=sys.stderr)
    except (ValueError, TypeError) as e:  # raised by the config file's get_config(arg)
        print(f"error: {e}", file=sys.stderr)
    except Exception as e:  # anything else the config file raises while it loads
        print(f"error: --config {_config_file(argv)}: {type(e).__name__}: "
              f"{' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
