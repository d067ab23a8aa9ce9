"""The engine's part of a config, checked before anything runs, and what a workdir's saved config
must share with the config that resumes it. Tasks check their own sections."""

import json
import math

from seqjax import config as config_lib
from seqjax import files
from seqjax.train import parallel
from seqjax.train.optimizer import OPTIMIZERS, SCHEDULES

# What a checkpoint's shapes and meaning depend on: resuming a workdir with any of these changed
# is an error. The rest (steps, schedule, learning rate, dropout, unroll, a linear
# recurrence's scan, computation dtype, rematerialisation, attention implementation,
# evaluation, logging) may change.
RESUME_KEYS = ("task", "model", "data.preprocess", "data.min_freq", "data.batch_size",
               "data.tokenizer", "data.vocab_size", "data.max_pairs", "data.num_valid",
               "data.num_test", "data.pack", "data.pack_max_sequences", "opt.name",
               "opt.grad_accum_steps")
RESUME_FREE = ("model.dropout", "model.attention_dropout", "model.unroll", "model.dtype",
               "model.init", "model.linear.scan", "model.remat", "model.attention_impl")


def check_config(config):
    """Checks the engine's part of a config: steps, devices, optimizer."""
    config_lib.expect_positive_int(config, "num_train_steps", "log_every", "eval_every",
                                   "checkpoint_every", "keep_checkpoints")
    config_lib.expect_type(config, "seed", int)
    config_lib.expect_type(config, "num_devices", int)
    if config.get("init_from_step") is not None:
        config_lib.expect(isinstance(config.init_from_step, int) and config.init_from_step >= 0
                          and config.get("init_from"), "init_from_step", config.init_from_step,
                          "a step (>= 0) of the run in config.init_from, which must be set")
    for step in config.get("keep_steps", ()):
        config_lib.expect(isinstance(step, int) and 0 < step <= config.num_train_steps,
                          "keep_steps", config.keep_steps,
                          "steps to keep a checkpoint of, each in [1, num_train_steps]")
    kind = config.get("parallel", "pmap")
    config_lib.expect(kind in parallel.KINDS, "parallel", kind, f"expected one of {parallel.KINDS}")
    opt = config.opt
    config_lib.expect(opt.name in OPTIMIZERS, "opt.name", opt.name, f"expected one of {OPTIMIZERS}")
    config_lib.expect(opt.schedule in SCHEDULES, "opt.schedule", opt.schedule,
                      f"expected one of {SCHEDULES}")
    for key in ("lr", "clip_norm", "weight_decay", "final_lr_fraction", "b1", "b2", "momentum"):
        value = config_lib.expect_type(config, f"opt.{key}", (int, float))
        config_lib.expect(math.isfinite(value) and value >= 0, f"opt.{key}", value,
                          "must be a finite number >= 0")
    config_lib.expect(opt.lr > 0, "opt.lr", opt.lr, "must be > 0")
    config_lib.expect_positive_int(config, "opt.grad_accum_steps")
    config_lib.expect(config.num_train_steps % opt.grad_accum_steps == 0, "num_train_steps",
                      config.num_train_steps, f"must be a multiple of opt.grad_accum_steps="
                      f"{opt.grad_accum_steps}: the last micro-steps would never be applied")
    if "decay_biases_and_norms" in opt:  # absent from configs written before it: True
        config_lib.expect_type(config, "opt.decay_biases_and_norms", bool)
    value = config_lib.expect_type(config, "opt.warmup_steps", int)
    config_lib.expect(value >= 0, "opt.warmup_steps", value, "must be >= 0")


def check_workdir(workdir: str) -> str:
    """The absolute path (or the URL: gs://bucket/run) of a workdir that is not empty and, if it
    exists, is a directory."""
    if not isinstance(workdir, str) or not workdir.strip():
        raise ValueError(f"workdir {workdir!r}: give the directory of the run")
    if files.exists(workdir) and not files.is_dir(workdir):
        raise ValueError(f"workdir {workdir!r} is a file, not a directory")
    return files.absolute(workdir)


def check_resumable(saved, config, workdir: str):
    """Raises a ValueError listing what `config` changes of the run `saved` in `workdir`
    (a config.json) that its checkpoints depend on."""
    diff = config_lib.differences(resume_signature(saved), resume_signature(config))
    if diff:
        raise ValueError(
            f"{workdir} holds a run with a different model or data; use another workdir, or "
            f"the same config and overrides (see its {config_lib.CONFIG_FILE}). Differences: "
            + "; ".join(diff))


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_signature(config) -> dict:
    flat = config_lib.flatten(config)
    signature = {k: v for k, v in flat.items() if not _under(k, RESUME_FREE)
                 and _under(k, RESUME_KEYS)}
    # Switches that add or remove optimizer state.
    signature["opt.clip_norm > 0"] = bool(flat.get("opt.clip_norm"))
    if flat.get("opt.name") == "sgd":
        signature["opt.momentum > 0"] = bool(flat.get("opt.momentum"))
    return json.loads(json.dumps(signature, default=str))  # as read back from config.json
