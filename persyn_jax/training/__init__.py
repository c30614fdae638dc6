"""The training core shared by SFT and the router: a typed state, one step factory (gradient
accumulation, NaN guard), one optimizer factory with parameter groups, and a loop with hooks.

    tx = make_optimizer([ParamGroup("all", schedule, weight_decay=0.1, decay_mask=matrices)],
                        grad_clip=1.0)
    step = jax.jit(make_train_step(loss, tx, normalize_by="tokens"), donate_argnums=0)
    loop = TrainLoop(lambda s, b: step(s, frozen, b), total_steps)
    loop.add_hook(log, every=10)
    state, last = loop.run(TrainState.create(params, tx), batches)

Checkpoints are persyn_jax.checkpoints (a lower layer: the models' orbax loader uses it too).
"""
from persyn_jax.training.loop import EarlyStopping, StepInfo, TrainLoop, checkpoint_hook
from persyn_jax.training.optim import ParamGroup, label_by_path, make_optimizer, matrices
from persyn_jax.training.state import TrainState, state_shapes
from persyn_jax.training.step import make_eval_step, make_train_step

__all__ = ["TrainState", "state_shapes", "make_train_step", "make_eval_step", "TrainLoop",
           "StepInfo", "checkpoint_hook", "EarlyStopping", "ParamGroup", "make_optimizer",
           "matrices", "label_by_path"]
