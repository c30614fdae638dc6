"""The Route-then-Generate run as a declared graph of stages.

    graph.py    Stage (name, reads, config, run) and the DONE key derived from it
    runner.py   Run: manifests, skipping, stale outputs, barriers; GRAPH, the stages in order
    context.py  what the stages share: config, paths, prompt split, meshes, models, records
    probe.py score.py router.py route.py generate.py sft.py eval.py study.py: one module per
                stage (study: optional, the teacher study)

The stages know nothing of the toy world: the CLI (persyn_jax.train) resolves `world:` first.
"""
from persyn_jax.stages.context import Context, teacher_shards
from persyn_jax.stages.graph import Stage, stage_key
from persyn_jax.stages.runner import FORMAT, GRAPH, Run, RunDirError

__all__ = ["Run", "RunDirError", "GRAPH", "FORMAT", "Stage", "stage_key", "Context",
           "teacher_shards"]
