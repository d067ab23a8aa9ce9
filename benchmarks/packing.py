r"""Sequence packing: the padding it removes and the training throughput it gains, on CPU.

    python benchmarks/packing.py              # default configs: ~5 minutes on 2 shared CPU cores
    python benchmarks/packing.py --smoke      # the tiny configs and 2 short rounds (a minute)
    python benchmarks/packing.py --steps=10 --repeats=9

Padding: the fraction of padding tokens in the training rows, one sequence a row against packed
rows (`seqjax.data.packing`: first-fit decreasing, rows of the same length), of
- the shipped English-French pairs as experiments/translate.py's default config prepares them
  (`seqjax.tasks.translation.build`, `data.pack` False and True: its word tokenizers and
  `num_steps` tokens a sentence), source and target rows;
- the WikiText-2 pretraining sequences of experiments/bert_pretrain.py's default config
  (`seqjax.tasks.bert.train_rows`, with the WordPiece tokenizer the task trains).

Throughput: the translation task's training step, unpacked and packed, with the same
`data.batch_size` rows a batch: `jax.grad` of the task's summed loss divided by its weight (as
the engine's step does), an optax adamw update, jitted with the state donated; dropout as the
config has it, its key folded from the step. Each variant steps through the first 8 batches of
its task's `train_batch`. The variants run in turn, 2 warm-up rounds then --repeats timed
rounds of --steps steps, so that a change of load on a shared machine hits both alike. Real
tokens are the non-padding source and target tokens of a batch; real tokens/s = their mean
per step / the median seconds a step; "vs unpacked" is the median over rounds of (unpacked
time / packed time) x (packed real tokens a step / unpacked real tokens a step).
"""

import functools
import statistics
import time

import jax
import optax
from absl import app, flags

from seqjax import config as config_lib
from seqjax.data import pretraining
from seqjax.tasks import bert, translation

from common import environment, interleaved_times, load_average, paired_median

flags.DEFINE_integer("steps", 5, "Training steps a timed round.")
flags.DEFINE_integer("repeats", 7, "Timed rounds.")
flags.DEFINE_bool("smoke", False, "The tiny translate and smoke BERT configs, 2 rounds of 1 "
                  "step: a smoke test.")
FLAGS = flags.FLAGS
BATCHES = 8


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def _translation_padding(rows: dict, num_steps: int) -> dict:
    """Rows and padding fractions of the source, the target and both, of unpacked
    (src_len, tgt_len) or packed (segment ids) rows."""
    real = {side: (rows[f"{side}_segment_ids"] > 0).sum() if f"{side}_segment_ids" in rows
            else rows[f"{side}_len"].sum() for side in ("src", "tgt")}
    slots = len(rows["src"]) * num_steps
    return dict(rows=len(rows["src"]), src=1 - real["src"] / slots, tgt=1 - real["tgt"] / slots,
                both=1 - (real["src"] + real["tgt"]) / (2 * slots))


def _real_tokens(batch) -> int:
    src = (batch["src_segment_ids"] > 0).sum() if "src_segment_ids" in batch \
        else batch["src_valid_len"].sum()
    return int(src + batch["weights"].sum())


def _trainer(task, config):
    """A function that runs `steps` training steps on the task's first batches (cycling) and
    blocks until they are done, and the mean real tokens of those batches."""
    tx = optax.adamw(config.opt.lr, b1=config.opt.b1, b2=config.opt.b2,
                     weight_decay=config.opt.weight_decay)
    batches = [task.train_batch(step) for step in range(BATCHES)]
    real_tokens = statistics.mean(_real_tokens(b) for b in batches)
    batches = [jax.device_put(b) for b in batches]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, step, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)

        def loss_sum(params):
            sums, _ = task.loss(params, batch, rng=rng, train=True)
            return sums["loss"], sums["weight"]

        grads, weight = jax.grad(loss_sum, has_aux=True)(params)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = jax.jit(task.init_params)(jax.random.PRNGKey(config.seed))
    state = {"params": params, "opt_state": tx.init(params), "step": 0}

    def run(steps):
        for _ in range(steps):
            state["params"], state["opt_state"] = train_step(
                state["params"], state["opt_state"], state["step"],
                batches[state["step"] % BATCHES])
            state["step"] += 1
        jax.block_until_ready(state["params"])

    return run, real_tokens


def main(argv):
    del argv
    steps, repeats = (1, 2) if FLAGS.smoke else (FLAGS.steps, FLAGS.repeats)
    print(environment(extras=[load_average()]))

    # --- translation: padding -----------------------------------------------------------------
    base = config_lib.load_experiment("experiments/translate.py").get_config(
        "tiny" if FLAGS.smoke else None)
    tasks, padding = {}, {}
    for pack in (False, True):
        config = config_lib.override(base, {"data.pack": pack})
        start = time.perf_counter()
        tasks[pack] = (translation.build(config), config)
        rows = tasks[pack][0].train_batch.rows.arrays
        padding[pack] = _translation_padding(rows, config.data.num_steps)
        print(f"translation task built with data.pack={pack} in "
              f"{time.perf_counter() - start:.0f} s")
    d = base.data
    print(f"\nTranslation, experiments/translate.py{':tiny' if FLAGS.smoke else ''} "
          f"(num_steps {d.num_steps}, tokenizer {d.tokenizer}):")
    print("| rows | unpacked | packed |\n| --- | --- | --- |")
    print(f"| training rows | {padding[False]['rows']:,} | {padding[True]['rows']:,} |")
    for side, name in (("src", "source"), ("tgt", "target"), ("both", "source + target")):
        print(f"| padding, {name} | {_percent(padding[False][side])} | "
              f"{_percent(padding[True][side])} |")

    # --- BERT pretraining: padding ------------------------------------------------------------
    config = config_lib.load_experiment("experiments/bert_pretrain.py").get_config(
        "smoke" if FLAGS.smoke else None)
    d = config.data
    documents = pretraining.load_wikitext("train", d.train_file, d.max_documents)
    tokenizer = pretraining.train_tokenizer([s for doc in documents for s in doc], d.vocab_size)
    bert_rows = {pack: bert.train_rows(config_lib.override(config, {"data.pack": pack}),
                                       tokenizer, documents) for pack in (False, True)}
    real = bert_rows[False]["valid_len"].sum()
    assert real == (bert_rows[True]["pack_ids"] > 0).sum()
    print(f"\nBERT pretraining, experiments/bert_pretrain.py{':smoke' if FLAGS.smoke else ''} "
          f"(max_seq_len {d.max_seq_len}, pack_max_sequences {d.pack_max_sequences}):")
    print("| rows | unpacked | packed |\n| --- | --- | --- |")
    print(f"| training rows | {len(bert_rows[False]['tokens']):,} | "
          f"{len(bert_rows[True]['tokens']):,} |")
    print("| padding | " + " | ".join(_percent(1 - real / rows["tokens"].size)
                                       for rows in bert_rows.values()) + " |")

    # --- translation: throughput --------------------------------------------------------------
    runs, real_tokens = {}, {}
    for pack, name in ((False, "unpacked"), (True, "packed")):
        runs[name], real_tokens[name] = _trainer(*tasks[pack])
    times = interleaved_times({name: functools.partial(run, steps) for name, run in runs.items()},
                              repeats)
    print(f"\nTranslation training on CPU, batch_size {base.data.batch_size} rows, {steps} steps "
          f"a round, {repeats} rounds ({load_average()}):")
    print("| rows | ms/step | real tokens/step | real tokens/s | vs unpacked |")
    print("| --- | --- | --- | --- | --- |")
    for name in runs:
        seconds = statistics.median(times[name]) / steps
        gain = paired_median(times["unpacked"], times[name]) * real_tokens[name] / \
            real_tokens["unpacked"]
        print(f"| {name} | {1000 * seconds:.1f} | {real_tokens[name]:,.0f} | "
              f"{real_tokens[name] / seconds:,.0f} | {gain:.2f}x |")


if __name__ == "__main__":
    app.run(main)
