"""What a curve of downstream accuracy against pretraining compute needs: a pretraining run that
keeps its checkpoints at chosen steps (`keep_steps`), fine-tuning from one of them
(`init_from_step`), and a linear probe on a frozen encoder (`model.freeze_encoder`)."""

import jax
import numpy as np
import pytest

from seqjax.train import checkpoint
from seqjax.train.loop import train_and_evaluate

from conftest import load_config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bert") / "pretrain"
    config = load_config("bert_pretrain", "smoke")
    config.num_train_steps, config.checkpoint_every, config.keep_checkpoints = 6, 3, 1
    config.keep_steps = (2, 4)
    train_and_evaluate(config, str(workdir))
    return workdir


def _finetune(pretrained, workdir, **changes):
    config = load_config("bert_finetune", "smoke")
    config.unlock()
    config.init_from = str(pretrained)
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    train_and_evaluate(config, str(workdir))
    return checkpoint.restore_saved(str(workdir))[1]["params"]["params"]


def test_keep_steps_keep_those_checkpoints_beside_the_latest(pretrained):
    ckpts = checkpoint.Checkpoints(str(pretrained), 1)
    try:
        assert sorted(ckpts.managers["latest"].all_steps()) == [2, 4, 6]
    finally:
        ckpts.close()


def test_fine_tuning_from_a_chosen_step(pretrained, tmp_path):
    at_2 = checkpoint.restore_saved(str(pretrained), 2)[1]["params"]["params"]
    at_6 = checkpoint.restore_saved(str(pretrained))[1]["params"]["params"]
    assert not np.array_equal(at_2["encoder"]["token_embed"]["embedding"],
                              at_6["encoder"]["token_embed"]["embedding"])
    tuned = _finetune(pretrained, tmp_path / "from_2", init_from_step=2, num_train_steps=1,
                      **{"opt.lr": 1e-12})  # one step that barely moves anything
    np.testing.assert_allclose(tuned["encoder"]["token_embed"]["embedding"],
                               at_2["encoder"]["token_embed"]["embedding"], atol=1e-9)
    with pytest.raises(FileNotFoundError, match=r"no latest checkpoint at step 5 .* \[2, 4, 6\]"):
        _finetune(pretrained, tmp_path / "missing", init_from_step=5)


def test_a_frozen_encoder_is_a_linear_probe(pretrained, tmp_path):
    """With model.freeze_encoder the encoder and pooler end as loaded (no update, no weight
    decay), and only the classifier learns."""
    loaded = checkpoint.restore_saved(str(pretrained), 4)[1]["params"]["params"]
    tuned = _finetune(pretrained, tmp_path / "probe", init_from_step=4,
                      **{"model.freeze_encoder": True})
    for name in ("encoder", "pooler"):
        jax.tree.map(np.testing.assert_array_equal, tuned[name], loaded[name])
    free = _finetune(pretrained, tmp_path / "tuned", init_from_step=4)
    assert not np.array_equal(free["encoder"]["embed_ln"]["scale"],
                              loaded["encoder"]["embed_ln"]["scale"])
