r"""Long inputs: BERT pretraining at sequence length 1,024 with block-local attention against full
attention, on CPU: step time, compiled memory and held-out MLM accuracy after the same steps.

    python benchmarks/long_bert.py --steps=400 --out benchmarks/results/long_bert_cpu.txt
    python benchmarks/long_bert.py --smoke    # smoke config, length 64, 2 steps: under a minute
    python benchmarks/long_bert.py --steps=250 --timed_steps=3 --repeats=9

(On 2 shared CPU cores a full-attention step takes ~2 s: 400 steps are ~14 minutes a variant;
benchmarks/README.md's table used --steps=250.)

Both variants are experiments/bert_pretrain.py's default config (BERT-Tiny, pre-norm, the
shipped WikiText-2) with data.max_seq_len=1024, model.max_position=1024, data.max_predictions
=154 (15% of 1,024), data.batch_size=--batch_size, data.eval_batch_size=8, data.num_valid=
--num_valid, data.dupe_factor=1, num_train_steps=--steps, opt.warmup_steps=steps // 10, one
evaluation and one checkpoint at the end; they differ only in the attention:
- local: model.attention='local', block_size=128, look_back=1, look_ahead=1 (every token sees
  its own block of 128 and one block each way: at most 384 keys, O(L * block) work);
- full: model.attention='full', attention_impl='seqjax' (every token sees all 1,024).
(--smoke: the `smoke` config arg, length 64, block 16, 2 steps.)

Step time: the engine's own training step (`common.EngineTrainer`: `seqjax.train.step.
train_step` with the config's optimizer, compiled on one device as the training loop compiles
it, state donated, from the fresh state), on each variant's first 8 training batches. The
variants run in turn (`common.interleaved_times`), 2 warm-up rounds then --repeats timed
rounds of --timed_steps steps, so that a change of load on a shared machine hits both alike;
the step time is the median round / --timed_steps, "local/full" the median over rounds of the
ratio of the paired rounds (`common.paired_median`).

Memory: XLA's `memory_analysis()` of that compiled step (the pmap'd function
`.lower(state, batch).compile()`): temp (the executable's own buffers: activations kept for
the backward pass, attention scores, gradients) and arguments + outputs (state and batch in,
state and metrics out; the state is donated, so those partly alias).

Accuracy: `seqjax.train.loop.train_and_evaluate` of each variant in a temporary workdir, one
after the other, reporting its held-out MLM accuracy and loss (on --num_valid validation
sequences, the task's fixed mask) after --steps steps, and its `train_time_s` (the training
loop's wall time: compilation and the final evaluation included).
"""

import functools
import math
import statistics
import tempfile
import time

from absl import app, flags

from seqjax import config as config_lib
from seqjax import tasks
from seqjax.train import loop

from common import EngineTrainer, environment, interleaved_times, load_average, paired_median

flags.DEFINE_integer("steps", 400, "Training steps of each variant's run.")
flags.DEFINE_integer("batch_size", 8, "Training sequences a batch.")
flags.DEFINE_integer("num_valid", 64, "Held-out sequences the MLM accuracy is measured on.")
flags.DEFINE_integer("timed_steps", 3, "Training steps a timed round.")
flags.DEFINE_integer("repeats", 7, "Timed rounds.")
flags.DEFINE_string("out", None, "Also write the report (not the training logs) to this file.")
flags.DEFINE_bool("smoke", False, "The smoke config at length 64, 2 steps, 2 rounds of 1 step.")
FLAGS = flags.FLAGS
LENGTH, BLOCK = 1024, 128
VARIANTS = {  # name -> (attention column, model overrides)
    "local": ("local, block {block}, 1 block each way",
              {"model.attention": "local", "model.look_back": 1, "model.look_ahead": 1}),
    "full": ("full (seqjax)", {"model.attention": "full", "model.attention_impl": "seqjax"}),
}


def variant_config(name: str, steps: int):
    length, block = (64, 16) if FLAGS.smoke else (LENGTH, BLOCK)
    base = config_lib.load_experiment("experiments/bert_pretrain.py").get_config(
        "smoke" if FLAGS.smoke else None)
    return config_lib.override(base, {
        "data.max_seq_len": length, "model.max_position": length,
        "data.max_predictions": math.ceil(0.15 * length), "data.batch_size": FLAGS.batch_size,
        "data.eval_batch_size": 8, "data.num_valid": 16 if FLAGS.smoke else FLAGS.num_valid,
        "data.dupe_factor": 1, "num_train_steps": steps, "opt.warmup_steps": steps // 10,
        "log_every": 50, "eval_every": steps, "checkpoint_every": steps, "keep_checkpoints": 1,
        "model.block_size": block, **VARIANTS[name][1]})


def mib(n) -> str:
    return f"{n / 2**20:,.1f}"


def main(argv):
    del argv
    started = time.perf_counter()
    lines = []

    def report(line=""):
        print(line, flush=True)
        lines.append(line)

    steps = 2 if FLAGS.smoke else FLAGS.steps
    timed_steps, repeats = (1, 2) if FLAGS.smoke else (FLAGS.timed_steps, FLAGS.repeats)
    report(environment(extras=[load_average()]))
    configs = {name: variant_config(name, steps) for name in VARIANTS}
    d, m = configs["full"].data, configs["full"].model
    report(f"BERT-{m.size} (pre-norm), length {d.max_seq_len}, batch {d.batch_size}, "
           f"{steps} steps, held-out MLM on {d.num_valid} sequences")

    # --- step time and compiled memory -------------------------------------------------------
    runs, memory = {}, {}
    for name, config in configs.items():
        runs[name] = EngineTrainer(tasks.build(config, None), config, batches=8)
        m = runs[name].compile().memory_analysis()
        memory[name] = dict(temp=m.temp_size_in_bytes,
                            in_out=m.argument_size_in_bytes + m.output_size_in_bytes,
                            alias=m.alias_size_in_bytes)
    times = interleaved_times({name: functools.partial(run, timed_steps)
                               for name, run in runs.items()}, repeats)
    report(f"step time: 2 warm-up rounds, {repeats} rounds of {timed_steps} steps, variants "
           f"interleaved ({load_average()})")
    del runs

    # --- accuracy after the same steps -------------------------------------------------------
    results = {}
    for name, config in configs.items():
        with tempfile.TemporaryDirectory() as workdir:
            results[name] = loop.train_and_evaluate(config, workdir)
        report(f"{name}: trained {steps} steps in {results[name]['train_time_s']:.0f} s "
               f"({load_average()})")

    report()
    report("| variant | attention | step time (median s) | local/full time | compiled temp MiB "
           "| arguments + outputs MiB | held-out MLM accuracy | MLM loss | train time s |")
    report("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, config in configs.items():
        r, mem = results[name], memory[name]
        ratio = paired_median(times[name], times["full"])
        report(f"| {name} | {VARIANTS[name][0].format(block=config.model.block_size)} | "
               f"{statistics.median(times[name]) / timed_steps:.3f} | {ratio:.2f} | "
               f"{mib(mem['temp'])} | {mib(mem['in_out'])} | {r['val_mlm_accuracy']:.4f} | "
               f"{r['val_mlm_loss']:.3f} | {r['train_time_s']:.0f} |")
    t = {k: memory[k]["temp"] for k in memory}
    report(f"\ncompiled temp local/full {t['local'] / t['full']:.2f}; aliased (donated) MiB: "
           + ", ".join(f"{k} {mib(v['alias'])}" for k, v in memory.items()))
    report(f"elapsed {time.perf_counter() - started:.0f} s")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
