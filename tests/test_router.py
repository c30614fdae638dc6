"""The router: Bradley-Terry loss, pairs, metrics, learning a known routing rule, checkpoints,
sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persyn_jax import sharding as shd
from persyn_jax.router import (Router, RouterConfig, bt_loss, bt_loss_np, build_pairs,
                               router_metrics)
from persyn_jax.router_train import held_out_split, train_router


def numpy_bt(scores, wins):
  """Loss and d loss / d scores of mean_{(w, l)} -log sigma(s_w - s_l), written out pair by pair."""
  loss, grad, n = 0.0, np.zeros_like(scores), wins.sum()
  for b, i, j in zip(*np.nonzero(wins)):
    d = scores[b, i] - scores[b, j]
    loss += np.log1p(np.exp(-d)) if d > -30 else -d  # -log sigma(d)
    g = -1.0 / (1.0 + np.exp(d))  # d/dd of -log sigma(d) = -(1 - sigma(d))
    grad[b, i] += g
    grad[b, j] -= g
  return loss / n, grad / n


def test_bt_loss_and_gradient_match_numpy():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(5, 4)) * 3
  scores[0] = [80.0, -80.0, 0.0, 1e-3]  # huge gaps must stay finite (softplus, not log(sigmoid))
  wins, _ = build_pairs(rng.normal(size=(5, 4)))
  wins[0] = 0
  wins[0, 1, 0] = wins[0, 0, 2] = 1  # the loser of the first pair scores 160 above its winner
  want_loss, want_grad = numpy_bt(scores, wins)
  loss, grad = jax.value_and_grad(bt_loss)(jnp.asarray(scores), jnp.asarray(wins))
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
  assert np.isfinite(float(loss)) and float(loss) > 160 / wins.sum() - 1
  assert bt_loss_np(scores, wins) == pytest.approx(want_loss, rel=1e-12)
  assert float(bt_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3, 3)))) == 0.0  # no pairs: no loss


def test_build_pairs_labels_drops_ties_and_counts():
  r = np.array([[0.9, 0.2, 0.9, np.nan],
                [0.1, 0.5, 0.3, 0.3 + 1e-9]])
  wins, counts = build_pairs(r, tie_tolerance=1e-6)
  assert counts == {"prompts": 2, "teachers": 4, "candidate_pairs": 3 + 6, "pairs": 2 + 5,
                    "ties": 2, "missing": 3, "prompts_with_pairs": 2}
  assert wins[0, 0, 1] == wins[0, 2, 1] == 1 and wins[0, 0, 2] == wins[0, 2, 0] == 0
  assert wins[1, 1].tolist() == [1, 0, 1, 1] and wins[1, 2, 3] == wins[1, 3, 2] == 0
  assert np.all(wins * np.transpose(wins, (0, 2, 1)) == 0)  # never both directions


def test_router_metrics_on_a_hand_made_case():
  teachers = ["A", "B", "C", "D"]
  rewards = np.array([[1.0, 0.0, 0.5, 0.2],   # oracle A
                      [0.0, 1.0, 1.0, 0.2],   # oracle B and C (tie)
                      [0.3, 0.2, 0.1, 0.9]])  # oracle D
  scores = np.array([[5.0, 1.0, 3.0, 2.0],    # top-1 A: hit
                     [0.0, 1.0, 3.0, 2.0],    # top-1 C: hit (tied oracle)
                     [4.0, 3.0, 2.0, 1.0]])   # D ranked last: miss at 1 and 3
  m = router_metrics(scores, rewards, teachers)
  assert m["hit@1"] == pytest.approx(2 / 3) and m["hit@3"] == pytest.approx(2 / 3)
  assert m["shares"] == {"A": 2 / 3, "B": 0.0, "C": 1 / 3, "D": 0.0}
  # the B = C tie splits its prompt, never goes to the first listed
  assert m["oracle_shares"] == pytest.approx({"A": 1 / 3, "B": 1 / 6, "C": 1 / 6, "D": 1 / 3})
  # pairs: 6 + 5 (the B = C tie is dropped) + 6 = 17; ordered right by the scores:
  # row 0: A>B A>C A>D C>B C>D D>B all right (6); row 1: B>A C>A C>D D>A right, B>D wrong (4);
  # row 2: A>B A>C B>C right, D>A D>B D>C wrong (3)
  assert m["pairs"] == 17 and m["pairwise_accuracy"] == pytest.approx(13 / 17)
  assert m["random_hit@1"] == pytest.approx((1 / 4 + 2 / 4 + 1 / 4) / 3)
  assert m["random_hit@3"] == pytest.approx((3 / 4 + 1.0 + 3 / 4) / 3)


def test_router_metrics_count_only_the_teachers_route_may_pick():
  """An unroutable teacher (no training pair compared it) keeps an untrained score that may top
  the others; route() never picks it, so Hit@k, the shares and the random router's Hit@k are over
  the routable teachers, as route() chooses."""
  teachers = ["A", "B", "C", "D"]
  rewards = np.array([[1.0, 0.0, 0.5, np.nan],   # oracle A
                      [0.0, 1.0, 1.0, np.nan],   # oracle B and C
                      [0.3, 0.9, 0.1, np.nan],   # oracle B
                      [0.2, 0.1, 0.9, np.nan]])  # oracle C
  scores = np.array([[1.0, 0.0, 2.0, 9.0],       # routable top: C (miss); D tops every row
                     [0.0, 1.0, 3.0, 9.0],       # C (hit)
                     [4.0, 3.0, 2.0, 9.0],       # A (miss), top-2 A, B (hit at 3)
                     [0.0, 1.0, 2.0, 9.0]])      # C (hit)
  routable = ["A", "B", "C"]
  m = router_metrics(scores, rewards, teachers, routable=routable)
  # independent: route()'s pick (argmax over the routable columns) and its top 3 of those
  ok = np.array([t in routable for t in teachers])
  masked = np.where(ok, scores, -np.inf)
  pick = masked.argmax(1)
  oracle = [{0}, {1, 2}, {1}, {2}]
  assert m["hit@1"] == pytest.approx(np.mean([p in o for p, o in zip(pick, oracle)])) == 0.5
  top3 = np.argsort(-masked, axis=1)[:, :3]
  assert m["hit@3"] == pytest.approx(np.mean([bool(set(t) & o) for t, o in zip(top3, oracle)]))
  assert m["shares"] == {"A": 0.25, "B": 0.0, "C": 0.75, "D": 0.0}
  # a random router over the 3 routable teachers: |oracle| / 3 at 1, and certain at 3
  assert m["random_hit@1"] == pytest.approx(np.mean([len(o) / 3 for o in oracle]))
  assert m["random_hit@3"] == 1.0
  # every teacher routable: the pick is the plain argmax (D here), as before
  assert router_metrics(scores, rewards, teachers)["shares"]["D"] == 1.0


def test_held_out_split_is_seeded_and_disjoint():
  tr, ho = held_out_split(50, 0.2, seed=3)
  assert len(ho) == 10 and not set(tr) & set(ho) and sorted([*tr, *ho]) == list(range(50))
  assert np.array_equal(held_out_split(50, 0.2, seed=3)[1], ho)
  assert not np.array_equal(held_out_split(50, 0.2, seed=4)[1], ho)
  assert len(held_out_split(5, 0.01, seed=0)[1]) == 1


def test_router_weight_decay_spares_stacked_norm_scales_and_biases(model_dir):
  """AdamW decays the weight matrices only (docs/SCORING.md): with zero gradients one update is
  -lr * wd * p on the matrices and nothing on the norm scales and biases, which the scanned
  decoder stores stacked ([layers, dim], [layers, heads, head_dim]): rank >= 2, yet no matrix."""
  from flax import nnx
  from persyn_jax.router_train import optimizer
  path, _ = model_dir("llama_bias")
  cfg = RouterConfig(backbone=path, dtype="float32", warmup_ratio=0.0, weight_decay=0.1,
                     lr=1e-2, head_lr=1e-1)
  router = Router.from_backbone(path, ["a", "b"], cfg)
  _, params, _ = nnx.split(router.model, nnx.Param, ...)
  tx = optimizer(cfg, total_steps=10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  spared = []
  for key, u in nnx.to_flat_state(updates):
    name = "/".join(map(str, key))
    p = np.asarray(dict(nnx.to_flat_state(params))[key].get_value())
    lr = cfg.head_lr if key[0] == "head" else cfg.lr
    matrix = key[-1] in ("w", "embed")
    want = -lr * cfg.weight_decay * p if matrix else np.zeros_like(p)
    np.testing.assert_allclose(np.asarray(u.get_value()), want, rtol=1e-6, atol=0, err_msg=name)
    spared += [] if matrix else [name]
  assert "backbone/layers/attn_norm/scale" in spared and "backbone/layers/attn/q_bias/b" in spared
  assert "backbone/final_norm/scale" in spared and "head/b" in spared


# ---------------------------------------------------------------------------------------------
# a synthetic routing problem: the best teacher is a function of a keyword in the prompt

TEACHERS = ["t_apples", "t_world", "t_model", "t_number"]
KEYWORDS = ["apples", "world", "model", "number"]
FILLER = ("the a of to tiny language once upon time there was how are you today fine thank very "
          "much gives left").split()


def synthetic(n, seed):
  rng = np.random.default_rng(seed)
  prompts, rewards = [], []
  for _ in range(n):
    j = rng.integers(len(KEYWORDS))
    words = list(rng.choice(FILLER, 6)) + [KEYWORDS[j]]
    rng.shuffle(words)
    prompts.append(" ".join(words))
    r = rng.uniform(0.0, 0.5, len(KEYWORDS))  # the others: noise the router cannot learn
    r[j] = 1.0
    rewards.append(r)
  return prompts, np.asarray(rewards)


# One shape everywhere (a single 64-token bucket, <= 64 rows) keeps compilation to two programs.
TINY = dict(dtype="float32", lr=3e-3, head_lr=3e-3, warmup_ratio=0.0, batch_size=16, epochs=3,
            max_len=64, min_bucket=64, batch_tokens=64 * 64, max_batch_size=64,
            held_out_fraction=0.2, patience=4)


@pytest.fixture(scope="module")
def trained(model_dir):
  path, _ = model_dir("llama")
  prompts, rewards = synthetic(300, seed=0)
  router = Router.from_backbone(path, TEACHERS, RouterConfig(backbone=path, **TINY))
  assert router.route_token_id == router.model.backbone.cfg.vocab_size - 1  # a new embedding row
  router, report = train_router(router, prompts, rewards)
  return router, report


def test_router_learns_a_keyword_rule(trained):
  router, report = trained
  held = report["held_out"]
  assert report["held_out_prompts"] == 60 and report["pairs"]["pairs"] == 300 * 6
  assert held["hit@1"] >= 0.9, report
  assert held["hit@1"] - held["random_hit@1"] >= 0.5  # random: 0.25
  # fresh prompts from the same rule, routed by name
  prompts, rewards = synthetic(40, seed=1)
  names, scores = router.route(prompts)
  assert scores.shape == (40, 4)
  assert np.mean([n == TEACHERS[j] for n, j in zip(names, rewards.argmax(1))]) >= 0.9
  assert set(held["shares"]) == set(TEACHERS) and sum(held["shares"].values()) == pytest.approx(1)


def test_restored_router_routes_identically_also_when_sharded(trained, tmp_path):
  router, _ = trained
  prompts, _ = synthetic(24, seed=2)
  names, scores = router.route(prompts)
  router.save(str(tmp_path / "router"))
  again = Router.load(str(tmp_path / "router"))
  names2, scores2 = again.route(prompts)
  assert names2 == names and np.array_equal(scores2, scores)
  assert again.teachers == TEACHERS and again.config == router.config
  mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = Router.load(str(tmp_path / "router"), mesh=mesh)
  embed = sharded.model.backbone.embed.get_value()
  assert len(embed.sharding.device_set) == 8
  names3, scores3 = sharded.route(prompts)
  assert names3 == names
  np.testing.assert_allclose(scores3, scores, atol=1e-5, rtol=0)


def test_frozen_backbone_trains_the_head_only(model_dir):
  path, _ = model_dir("llama")
  prompts, rewards = synthetic(40, seed=3)
  cfg = RouterConfig(backbone=path, **{**TINY, "epochs": 1, "freeze_backbone": True,
                                       "pooling": "last_token", "held_out_fraction": 0.0})
  router = Router.from_backbone(path, TEACHERS, cfg)
  assert router.route_token_id is None
  before = jax.tree.map(np.asarray, nnx_state(router.model))
  router, report = train_router(router, prompts, rewards)
  after = jax.tree.map(np.asarray, nnx_state(router.model))
  assert report["steps"] == 3 and "held_out" not in report
  assert np.array_equal(before["backbone"]["embed"], after["backbone"]["embed"])
  assert not np.array_equal(before["head"]["w"], after["head"]["w"])


def test_held_out_prompts_without_pairs_do_not_stop_training(model_dir):
  """Held-out prompts with one scored teacher have no pair, hence no held-out loss: a constant 0
  must not stop training early (and keep the first evaluation's parameters)."""
  path, _ = model_dir("llama")
  prompts, rewards = synthetic(40, seed=3)
  cfg = RouterConfig(backbone=path, **{**TINY, "epochs": 4, "patience": 1, "evals_per_epoch": 1,
                                       "freeze_backbone": True})
  _, held = held_out_split(40, cfg.held_out_fraction, cfg.seed)
  rewards[held, 1:] = np.nan
  router, report = train_router(Router.from_backbone(path, TEACHERS, cfg), prompts, rewards)
  assert report["steps"] == report["total_steps"] == 8 and not report["stopped_early"]
  assert report["best_step"] == 8
  assert [h["held_out_loss"] for h in report["history"]] == [None] * 4
  assert report["held_out"]["pairs"] == 0 and np.isnan(report["held_out"]["loss"])


def test_the_held_out_split_is_evaluated_evals_per_epoch_times_per_epoch(model_dir):
  """8 steps per epoch, 3 evaluations each: after steps 2, 5 and 8 of every epoch (every 2 steps
  would be 4 per epoch, and patience counts evaluations)."""
  path, _ = model_dir("llama")
  prompts, rewards = synthetic(40, seed=3)
  cfg = RouterConfig(backbone=path, **{**TINY, "epochs": 2, "batch_size": 4, "patience": 100,
                                       "evals_per_epoch": 3, "freeze_backbone": True})
  router, report = train_router(Router.from_backbone(path, TEACHERS, cfg), prompts, rewards)
  assert report["train_prompts"] == 32 and report["steps"] == 16
  assert [h["step"] for h in report["history"]] == [2, 5, 8, 10, 13, 16]
  assert [h["epoch"] for h in report["history"]] == [0, 0, 0, 1, 1, 1]


def test_a_teacher_no_probe_pair_compares_is_never_routed(model_dir, tmp_path):
  """Every probe response of t_dead failed (NaN): its head output never learned anything, so even
  a score far above the others' must not route a prompt to it, also after save and load."""
  path, _ = model_dir("llama")
  prompts, rewards = synthetic(40, seed=4)
  rewards = np.concatenate([rewards, np.full((40, 1), np.nan)], axis=1)
  cfg = RouterConfig(backbone=path, **{**TINY, "epochs": 1, "freeze_backbone": True,
                                       "held_out_fraction": 0.0})
  router = Router.from_backbone(path, TEACHERS + ["t_dead"], cfg)
  b = router.model.head.b
  b.set_value(b.get_value().at[4].set(1e6))  # no pair moves it: it wins every argmax
  router, report = train_router(router, prompts, rewards)
  assert report["unroutable"] == ["t_dead"] and router.routable == TEACHERS
  # the report's router picks are route()'s: never the unroutable teacher
  assert report["train"]["shares"]["t_dead"] == 0.0
  assert sum(report["train"]["shares"].values()) == pytest.approx(1.0)
  b = router.model.head.b
  b.set_value(b.get_value().at[4].set(1e6))  # the untrained column wins every argmax
  names, scores = router.route(prompts[:8])
  assert (scores.argmax(1) == 4).all() and "t_dead" not in names
  assert names == [TEACHERS[j] for j in scores[:, :4].argmax(1)]
  router.save(str(tmp_path / "router"))
  again = Router.load(str(tmp_path / "router"))
  assert again.routable == TEACHERS and again.route(prompts[:8])[0] == names


def nnx_state(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model))


def test_router_numbers_a_run_cannot_use_are_refused_when_the_config_is_built():
  """A NaN or infinite rate trained the router to NaN scores without a word (route() then sent
  every prompt to the first teacher); a negative tie_tolerance labelled every pair both ways."""
  from persyn_jax import config as cfglib
  bad = [("lr", float("nan"), "must be a finite number >= 0"),
         ("lr", float("inf"), "must be a finite number >= 0"),
         ("head_lr", 0.0, "must be a finite number > 0"),
         ("weight_decay", -0.1, "must be a finite number >= 0"),
         ("grad_clip", float("nan"), "must be a finite number >= 0"),
         ("min_delta", float("nan"), "must be a finite number >= 0"),
         ("tie_tolerance", -1e-6, "must be a finite number >= 0"),
         ("warmup_ratio", 1.0, r"must be in \[0, 1\)"),
         ("patience", 0, "must be >= 1")]
  for name, value, match in bad:
    with pytest.raises(ValueError, match=rf"run.yaml.router.*router.{name}={value}: {match}"):
      cfglib.from_dict(RouterConfig, {name: value}, where="run.yaml.router")
  wins, _ = build_pairs(np.array([[0.2, 0.5]]), tie_tolerance=0.0)  # the allowed bounds still work
  assert wins[0].tolist() == [[0, 0], [1, 0]]
  RouterConfig(lr=0.0, weight_decay=0.0, grad_clip=0.0, min_delta=0.0, tie_tolerance=0.0)


def test_router_config_and_inputs_are_checked(model_dir):
  with pytest.raises(ValueError, match="held_out_fraction"):
    RouterConfig(held_out_fraction=1.0)
  with pytest.raises(ValueError, match="pooling"):
    RouterConfig(pooling="mean")
  path, _ = model_dir("llama")
  with pytest.raises(ValueError, match="distinct teachers"):
    Router.from_backbone(path, ["a", "a"], RouterConfig(dtype="float32"))
