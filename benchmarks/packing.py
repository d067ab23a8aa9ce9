r"""Sequence packing: the padding it removes and the training throughput it gains, on CPU.

    python benchmarks/packing.py              # the default configs
    python benchmarks/packing.py --smoke      # the tiny configs and 2 short rounds
    python benchmarks/packing.py --steps=10 --repeats=9

Padding: the fraction of padding tokens in the training rows, one sequence a row against packed
rows (`seqjax.data.packing`: first-fit decreasing, rows of the same length), of
- the shipped English-French pairs as experiments/translate.py's default config prepares them
  (`seqjax.tasks.translation.train_rows` of the training split, `data.pack` False and True,
  with the word tokenizers the task trains and `num_steps` tokens a sentence), source and
  target rows;
- the WikiText-2 pretraining sequences of experiments/bert_pretrain.py's default config
  (`seqjax.tasks.bert.train_rows` with the WordPiece tokenizer the task trains, and those
  sequences packed by `seqjax.data.pretraining.pack_pretraining`).

Throughput: the translation task's training step, unpacked and packed, with the same
`data.batch_size` rows a batch: the engine's own step (`seqjax.train.step.train_step` with the
config's optimizer, `seqjax.train.optimizer.make_optimizer`), compiled on one device as the
training loop compiles it (`seqjax.train.parallel`, the state donated), from the fresh state
the loop starts with. Each variant steps through the first 8 batches of its task's
`train_batch`. The variants run in turn, 2 warm-up rounds then --repeats timed rounds of
--steps steps, so that a change of load on a shared machine hits both alike. Real tokens are
the non-padding source and target tokens of a batch; real tokens/s = their mean per step / the
median seconds a step; "vs unpacked" is the median over rounds of (unpacked time / packed
time) x (packed real tokens a step / unpacked real tokens a step).
"""

import functools
import statistics
import time

from absl import app, flags

from seqjax import config as config_lib
from seqjax.data import pretraining
from seqjax.data import translation as translation_data
from seqjax.tasks import bert, translation
from seqjax.tasks.common import pack_align

from common import EngineTrainer, environment, interleaved_times, load_average, paired_median

flags.DEFINE_integer("steps", 5, "Training steps a timed round.")
flags.DEFINE_integer("repeats", 7, "Timed rounds.")
flags.DEFINE_bool("smoke", False, "The tiny translate and smoke BERT configs, 2 rounds of 1 "
                  "step: a smoke test.")
FLAGS = flags.FLAGS
BATCHES = 8  # the training batches each variant's steps cycle through


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def _real_tokens(batch) -> dict:
    """The non-padding source and target tokens of a teacher-forced batch (or of all rows)."""
    src = (batch["src_segment_ids"] > 0).sum() if "src_segment_ids" in batch \
        else batch["src_valid_len"].sum()
    return dict(src=int(src), tgt=int(batch["weights"].sum()))


def _translation_padding(rows: dict, num_steps: int) -> dict:
    """Rows and padding fractions of the source, the target and both, of training rows."""
    real = _real_tokens(translation_data.teacher_forcing(rows))
    slots = len(rows["src"]) * num_steps
    return dict(rows=len(rows["src"]), src=1 - real["src"] / slots, tgt=1 - real["tgt"] / slots,
                both=1 - (real["src"] + real["tgt"]) / (2 * slots))


def main(argv):
    del argv
    started = time.perf_counter()
    steps, repeats = (1, 2) if FLAGS.smoke else (FLAGS.steps, FLAGS.repeats)
    print(environment(extras=[load_average()]))

    # --- translation: padding -----------------------------------------------------------------
    base = config_lib.load_experiment("experiments/translate.py").get_config(
        "tiny" if FLAGS.smoke else None)
    train_pairs = translation._splits(base)["train"]
    src_tok, tgt_tok = (tok for tok, _ in translation.named_tokenizers(
        base, train_pairs, None).values())
    tasks, padding = {}, {}
    for pack in (False, True):
        config = config_lib.override(base, {"data.pack": pack})
        rows = translation.train_rows(config, src_tok, tgt_tok, train_pairs)
        padding[pack] = _translation_padding(rows, config.data.num_steps)
        start = time.perf_counter()
        tasks[pack] = (translation.build(config), config)
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
    tokenizer, _ = bert.named_tokenizer(config, None, documents)
    unpacked = bert.train_rows(config_lib.override(config, {"data.pack": False}), tokenizer,
                               documents)
    bert_rows = {False: unpacked, True: pretraining.pack_pretraining(
        unpacked, d.pack_max_sequences, pack_align(config))}
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
        runs[name] = EngineTrainer(*tasks[pack], batches=BATCHES)
        real_tokens[name] = statistics.mean(sum(_real_tokens(b).values())
                                            for b in runs[name].batches)
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
    print(f"\nelapsed {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    app.run(main)
