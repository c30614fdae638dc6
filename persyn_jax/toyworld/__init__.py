"""The embedded default world, as a config that the CLI resolves (`world:` in the run config).

    specs.py    its models and scales, without building anything (what --dry-run plans from)
    resolve.py  `resolve(cfg)`: the run config pointed at the built world; `plan_config(cfg)`:
                the same from the specs alone, for --dry-run
    build.py    the builder: tokenizer, teachers and student trained by our SFT, the cache
    tasks.py    the task (arithmetic word problems) and the teachers' answer styles

The stages know nothing of the world: `python -m persyn_jax.train` resolves it before the run.
This package's import is light (specs and resolve); the builder is imported only to build.
"""
from persyn_jax.toyworld.resolve import plan_config, resolve
from persyn_jax.toyworld.specs import (SCALES, WORLD_VERSION, Scale, Spec, architectures,
                                       model_config, spec_config)

__all__ = ["resolve", "plan_config", "architectures", "SCALES", "WORLD_VERSION", "Scale", "Spec",
           "model_config", "spec_config"]
