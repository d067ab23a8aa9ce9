"""Experiments that measure models instead of training one: `run(config, workdir)` dispatches on
`config.task`; each analysis trains (or reads) what it needs through the engine."""

ANALYSES = ("gradient_flow", "attention_maps")


def run(config, workdir: str) -> dict:
    from seqjax.analysis import attention_maps, gradient_flow
    runners = {"gradient_flow": gradient_flow.run, "attention_maps": attention_maps.run}
    return runners[config.task](config, workdir)

