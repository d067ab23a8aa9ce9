"""BERT pretraining on a corpus larger than memory: `prepare` tokenizes a user's text files (in
WikiText's layout) with the run's tokenizer into shards of training rows, block by block, and a
run with `config.data.shard_dir` streams them (`seqjax.data.streaming`); validation stays in
memory. The shard directory keeps the tokenizer that wrote it (`tokenizer.json`), which a new
run adopts; a run whose tokenizer is another (its own workdir's, or config.init_from's) is
refused, naming both.
"""

from seqjax.data import pretraining as data_lib
from seqjax.data import streaming
from seqjax.tasks.common import pack_align

TOKENIZER_FILE = "tokenizer.json"
BLOCK_CHARS = 1 << 23  # characters of text tokenized at a time: memory stays flat


def row_metadata(config) -> dict:
    """What a shard's rows depend on besides the tokenizer, as the manifest records it."""
    d = config.data
    metadata = dict(task=config.task, max_seq_len=d.max_seq_len, nsp=d.nsp,
                    dupe_factor=d.dupe_factor, pack=d.pack)
    if d.pack:
        metadata.update(pack_max_sequences=d.pack_max_sequences, align=pack_align(config))
    return metadata


def shard_tokenizer(shard_dir) -> tuple[str, str] | None:
    """(JSON, name) of the tokenizer that wrote the shards in `shard_dir`, or None if they have
    none beside them; a directory of no finished shards is an error here, before a run trains a
    tokenizer of its own."""
    streaming.read_manifest(shard_dir)
    path = streaming.local_dir(shard_dir) / TOKENIZER_FILE
    if not path.exists():
        return None
    name = f"the {TOKENIZER_FILE} of the shards in {str(shard_dir)!r}"
    return path.read_text(encoding="utf-8"), name


def _blocks_of_documents(sources):
    """The documents of `sources`, a block of whole articles at a time; a block of fewer than
    two documents joins its neighbour (next-sentence prediction draws from another one)."""
    pending = None
    for source in sources:
        for block in streaming.text_blocks(source, block_chars=BLOCK_CHARS,
                                           starts_block=data_lib.ARTICLE.match):
            documents = data_lib.parse_wikitext(block)
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


def prepare(config, tokenizer, tokenizer_name: str, sources, out_dir, train_rows) -> dict:
    """Writes the training rows of the text files `sources` (`train_rows(config, tokenizer,
    documents, seed)` of each block, seeded by its index) into shards in `out_dir`, with the
    tokenizer; returns the manifest."""
    text = tokenizer.to_str()
    metadata = dict(row_metadata(config),
                    tokenizer=streaming.tokenizer_metadata(tokenizer_name, text))
    rows = (train_rows(config, tokenizer, documents, seed=(config.seed, i))
            for i, documents in enumerate(_blocks_of_documents(sources)))
    return streaming.write_shards(rows, out_dir, metadata=metadata,
                                  extra_files={TOKENIZER_FILE: text})


def stream(config, tokenizer, tokenizer_name: str, process_index: int,
           process_count: int) -> streaming.StreamBatches:
    """The training minibatches of `config.data.shard_dir`, checked against this run: its
    tokenizer and the config its rows depend on."""
    d = config.data
    batches = streaming.StreamBatches(d.shard_dir, d.batch_size, seed=config.seed,
                                      shard_index=process_index, num_shards=process_count,
                                      metadata=row_metadata(config),
                                      what="packed rows" if d.pack else "sequences")
    theirs = batches.source.metadata.get("tokenizer", {})
    ours = streaming.tokenizer_metadata(tokenizer_name, tokenizer.to_str())
    if theirs.get("sha256") != ours["sha256"]:
        raise ValueError(f"config.data.shard_dir={d.shard_dir!r} was written with "
                         f"{theirs.get('name')} (SHA-256 {str(theirs.get('sha256'))[:12]}), "
                         f"this run tokenizes with {ours['name']} (SHA-256 "
                         f"{ours['sha256'][:12]}); prepare the shards with this run's tokenizer "
                         f"(--mode prepare --workdir of this run)")
    return batches
