"""Training corpora larger than memory, for BERT pretraining and translation: `prepare` writes
the training rows of a user's text files, tokenized with the run's tokenizers a block at a time,
into shards, and a run with `config.data.shard_dir` streams them (`seqjax.data.streaming`);
validation and test stay in memory. The shard directory keeps the tokenizers that wrote it,
which a new run adopts; a run whose tokenizers are others (its own workdir's, or
config.init_from's) is refused, naming both.
"""

import jax

from seqjax.data import pretraining, streaming
from seqjax.data import translation as translation_data
from seqjax.data.batching import RowBatches
from seqjax.tasks.common import pack_align, saved_file


def row_metadata(config) -> dict:
    """What a shard's rows depend on besides the tokenizers, as the manifest records it."""
    d = config.data
    if config.task == "translate":
        metadata = dict(task=config.task, num_steps=d.num_steps, pack=d.pack)
    else:
        metadata = dict(task=config.task, max_seq_len=d.max_seq_len, nsp=d.nsp,
                        dupe_factor=d.dupe_factor, pack=d.pack)
        if d.pack:
            metadata["pack_max_sequences"] = d.pack_max_sequences
    if d.pack:
        metadata["align"] = pack_align(config)
    return metadata


def shard_tokenizers(shard_dir, names) -> dict | None:
    """{file name: (JSON, where it comes from)} of the tokenizers that wrote the shards in
    `shard_dir`, or None if they lack one; a directory of no finished shards is an error here,
    before a run trains tokenizers of its own."""
    streaming.read_manifest(shard_dir)
    texts = {name: saved_file(str(streaming.local_dir(shard_dir)), name) for name in names}
    if any(text is None for text in texts.values()):
        return None
    return {name: (text, f"the {name} of the shards in {str(shard_dir)!r}")
            for name, text in texts.items()}


def texts(tokenizers: dict) -> dict:
    """{file name: JSON} (`Task.files`) of {file name: (JSON, where it comes from)}."""
    return {name: text for name, (text, _) in tokenizers.items()}


def document_blocks(sources):
    """The documents of `sources`, a block of whole articles at a time; a block of fewer than
    two documents joins its neighbour (next-sentence prediction draws from another one)."""
    pending = None
    for source in sources:
        for block in streaming.text_blocks(source, starts_block=pretraining.ARTICLE.match):
            documents = pretraining.parse_wikitext(block)
            if not documents:
                continue
            if pending is None:
                pending = documents
            elif len(pending) < 2 or len(documents) < 2:
                pending += documents
            else:
                yield pending
                pending = documents
    if pending is None:
        raise ValueError(f"the corpus {list(map(str, sources))} holds no text")
    yield pending


def pair_blocks(sources):
    """The (source, target) pairs of `sources`, a block of lines at a time."""
    for source in sources:
        lines_before = 0
        for block in streaming.text_blocks(source):
            lines = block.splitlines()
            pairs = translation_data.parse_pairs(lines, repr(str(source)), lines_before + 1)
            lines_before += len(lines)
            if pairs:
                yield pairs


def prepare(config, tokenizers: dict, rows, out_dir) -> dict:
    """Writes the chunks of training rows `rows` into shards in `out_dir`, with the
    `tokenizers` ({file name: (JSON, where it comes from)}) that made them; returns the
    manifest."""
    metadata = dict(row_metadata(config), tokenizers={
        name: streaming.tokenizer_metadata(origin, text)
        for name, (text, origin) in tokenizers.items()})
    return streaming.write_shards(rows, out_dir, metadata=metadata, extra_files={
        name: text for name, (text, _) in tokenizers.items()})


def train_batches(config, tokenizers: dict, rows, what: str, transform=None):
    """The training minibatches of a task: streamed from `config.data.shard_dir` (checked
    against the run's `tokenizers`), else of the rows `rows()` makes in memory; `transform`
    makes the model's batch of a minibatch's rows."""
    d = config.data
    if d.get("shard_dir") is not None:
        return stream(config, tokenizers, jax.process_index(), jax.process_count(), transform)
    return RowBatches(rows(), d.batch_size, seed=config.seed, shard_index=jax.process_index(),
                      num_shards=jax.process_count(), what=f"packed rows of {what}" if d.pack
                      else what, transform=transform)


def stream(config, tokenizers: dict, process_index: int, process_count: int,
           transform=None) -> streaming.StreamBatches:
    """The training minibatches of `config.data.shard_dir` (`transform` applied to each),
    checked against this run: its `tokenizers` ({file name: (JSON, where it comes from)}) and
    the config its rows depend on."""
    d = config.data
    batches = streaming.StreamBatches(d.shard_dir, d.batch_size, seed=config.seed,
                                      shard_index=process_index, num_shards=process_count,
                                      metadata=row_metadata(config), transform=transform,
                                      what="packed rows" if d.pack else "rows")
    recorded = batches.source.metadata.get("tokenizers", {})
    for name, (text, origin) in tokenizers.items():
        theirs = recorded.get(name, {})
        ours = streaming.tokenizer_metadata(origin, text)
        if theirs.get("sha256") != ours["sha256"]:
            raise ValueError(f"config.data.shard_dir={d.shard_dir!r} was written with "
                             f"{theirs.get('name')} (SHA-256 {str(theirs.get('sha256'))[:12]}), "
                             f"this run tokenizes with {ours['name']} (SHA-256 "
                             f"{ours['sha256'][:12]}); prepare the shards with this run's "
                             f"tokenizer (--mode prepare --workdir of this run)")
    return batches
