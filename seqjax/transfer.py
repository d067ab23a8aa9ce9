"""Hugging Face BERT checkpoints as seqjax runs, and seqjax BERT runs as Hugging Face
checkpoints (`launch.py --mode import`, `--mode export --format hf`; the layouts are
`seqjax.tasks.hf_bert`'s).

An imported checkpoint becomes a BERT pretraining workdir at step 0: its saved config (the
experiment's, with the model and vocabulary of the checkpoint), its tokenizer, and a checkpoint
of the full training state, so that it is evaluated, fine-tuned (`config.init_from`) or
pretrained further like a run of seqjax's own. Nothing is downloaded: the source is a local
directory (or a bucket's, through `seqjax.files`).
"""

import os
import tempfile

from seqjax import config as config_lib
from seqjax import files, tasks
from seqjax.data.pretraining import tokenizer_from_json
from seqjax.tasks import hf_bert
from seqjax.tasks.bert import TOKENIZER_FILE
from seqjax.tasks.common import saved_file
from seqjax.train import checks
from seqjax.train.checkpoint import Checkpoints
from seqjax.train.lock import WorkdirLock
from seqjax.train.loop import RunRecord, fresh_params, initial_state
from seqjax.train.optimizer import make_optimizer
from seqjax.train.saved_runs import restore_run


def import_checkpoint(config, source: str, workdir: str) -> dict:
    """Makes `workdir` (new or empty) a BERT pretraining run at step 0 holding the Hugging Face
    checkpoint in `source`, with `config` (experiments/bert_pretrain.py's) taking the
    checkpoint's model and vocabulary. Returns what was imported: the number of arrays, the
    modules left freshly initialised (heads the checkpoint lacks) and the vocabulary size."""
    if config.task != "bert_pretrain":
        raise ValueError(f"--mode import makes a BERT pretraining workdir: use "
                         f"experiments/bert_pretrain.py (config.task={config.task!r})")
    workdir = checks.check_workdir(workdir)
    if files.exists(workdir) and files.listdir(workdir):
        raise ValueError(f"--workdir {workdir!r} is not empty: an import writes a new run")
    values, arrays, tokenizer = hf_bert.read_checkpoint(source)
    config = config_lib.override(config, values, f"the config.json of {source!r}")
    with tempfile.TemporaryDirectory() as own:
        files.write_text(os.path.join(own, TOKENIZER_FILE), tokenizer.to_str())
        task = tasks.build(config, own)
    params, fresh = hf_bert.to_params(arrays, fresh_params(config, task))
    host = initial_state(config, task, make_optimizer(config.opt, config.num_train_steps), params)
    files.makedirs(workdir)
    with WorkdirLock(workdir):
        ckpts = Checkpoints(workdir, config.keep_checkpoints)
        try:
            ckpts.save(0, host, RunRecord().meta())
            ckpts.wait()
        finally:
            ckpts.close()
        config_lib.save(config, workdir)
        for name, text in task.files.items():
            files.write_text(os.path.join(workdir, name), text)
    return dict(arrays=len(arrays), fresh=fresh, vocab_size=tokenizer.get_vocab_size())


def export_checkpoint(workdir: str, out: str, *, step: int | None = None,
                      which: str = "latest", defaults=None) -> dict:
    """Writes a checkpoint of the BERT run in `workdir` (pretraining or fine-tuned) to
    directory `out` in Hugging Face's layout; returns {name: shape} of the arrays. `defaults`
    (the experiment's config) gives the fields a run saved before them lacks."""
    config, _, params, _ = restore_run(workdir, step, which, defaults)
    text = saved_file(files.absolute(workdir), TOKENIZER_FILE)
    if text is None:
        raise FileNotFoundError(f"{workdir!r} holds no {TOKENIZER_FILE}: not a BERT run")
    tokenizer = tokenizer_from_json(text, f"the {TOKENIZER_FILE} of {workdir}")
    return hf_bert.write_checkpoint(config, params, tokenizer, out)
