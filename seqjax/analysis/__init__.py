"""Experiments that measure models instead of training one: `run(config, workdir)` dispatches on
`config.task`; each analysis trains what it needs through the engine."""

ANALYSES = ("gradient_flow",)


def run(config, workdir: str) -> dict:
    from seqjax.analysis import gradient_flow
    runners = {"gradient_flow": gradient_flow.run}
    return runners[config.task](config, workdir)
