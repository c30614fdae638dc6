"""Routing policies on small hand-made score tables: what each policy selects, and the robustness
rules (the paper's baselines, our robustness rules): non-negative quality for CAR, failed teachers
never chosen, fair comparisons on shared prompts, seeded tie-breaking, the best of several samples.

Rewards are computed with `rewards.combine` (Eq. 2), the same function the score stage uses."""
import os
import subprocess
import sys

import numpy as np
import pytest

from persyn_jax import policies as pol
from persyn_jax.rewards import combine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = np.nan


def table(quality, learnability=None, teachers=None, alpha=0.4, ids=None) -> pol.ScoreTable:
  """A ScoreTable from [prompts, teachers] quality (NaN: no response) and learnability (mean
  student log-prob; default -1 wherever there is a quality)."""
  q = np.asarray(quality, np.float64)
  l = np.where(np.isnan(q), NAN, -1.0) if learnability is None else np.asarray(learnability,
                                                                               np.float64)
  teachers = tuple(teachers or (f"t{j}" for j in range(q.shape[1])))
  ids = tuple(ids or (f"p{i}" for i in range(q.shape[0])))
  return pol.ScoreTable(ids, teachers, q, l, combine(q, l, alpha))


def permuted(t: pol.ScoreTable, order) -> pol.ScoreTable:
  """The same scores with the teacher columns listed in another order."""
  order = list(order)
  return pol.ScoreTable(t.ids, tuple(t.teachers[j] for j in order), t.quality[:, order],
                        t.learnability[:, order], t.reward[:, order])


def choose(policy, t, cfg=pol.PolicyConfig(), **kw):
  return pol.assign(policy, list(t.ids), t, cfg, **kw)


def only(assignment):
  chosen = set(assignment.values())
  assert len(chosen) == 1, chosen
  return chosen.pop()


# -- 1. CAR: quality made non-negative first ---------------------------------------------------

def test_car_never_picks_a_teacher_worse_on_quality_and_nll_with_negative_rm_scores():
  # Skywork-like scores are negative: "good" is better on every prompt AND easier for the student.
  # The old mean-quality / (1 + beta * NLL) gave bad: -5 / (1 + 4) = -1 > good: -4 / (1 + 1) = -2.
  q = [[-4.2, -5.1], [-3.8, -4.9], [-4.0, -5.0]]
  l = [[-1.0, -4.0]] * 3
  t = table(q, l, teachers=("good", "bad"))
  assert only(choose("car", t)) == "good"
  assert only(choose("car", permuted(t, [1, 0]))) == "good"


def test_car_is_invariant_to_a_shift_of_the_reward_model_scale():
  # A reward model's offset is arbitrary: the same table shifted by -100 picks the same teacher.
  q = np.array([[0.9, 0.8, 0.1], [0.8, 0.75, 0.0], [1.0, 0.9, 0.2]])
  l = np.array([[-3.0, -0.2, -0.1]] * 3)
  picks = {only(choose("car", table(q + shift, l, teachers=("a", "b", "c"))))
           for shift in (0.0, -100.0, +50.0)}
  assert picks == {"b"}


def test_car_trades_quality_against_student_nll():
  # per-prompt min-max quality: a 1, b 0.875, c 0; NLL a 3, b 0.2, c 0.1 (beta 1):
  # a 1/4 = 0.25, b 0.875/1.2 = 0.73, c 0 -> b; with beta 0 CAR is mean quality -> a.
  q = [[-1.0, -1.5, -5.0]] * 4
  l = [[-3.0, -0.2, -0.1]] * 4
  t = table(q, l, teachers=("a", "b", "c"))
  assert only(choose("car", t)) == "b"
  assert only(choose("car", t, pol.PolicyConfig(car_beta=0.0))) == "a"


# -- 2. failed teachers and fair comparisons --------------------------------------------------

def broken_first():
  """'broken' is listed first and every one of its probe responses failed (NaN)."""
  q = [[NAN, 0.9, 0.5, 0.2], [NAN, 0.8, 0.6, 0.1], [NAN, 1.0, 0.4, 0.3]]
  return table(q, teachers=("broken", "strong", "mid", "weak"))


def test_a_teacher_whose_every_response_failed_is_never_strong_or_car():
  t = broken_first()
  assert only(choose("strong", t)) == "strong"
  assert only(choose("car", t)) == "strong"


def test_a_failed_teacher_is_never_family_strong():
  t = broken_first()
  fam = {"broken": "qwen", "strong": "llama", "mid": "qwen", "weak": "qwen"}
  assert only(choose("family_strong", t, families=fam, student_family="qwen")) == "mid"


def test_a_failed_teacher_is_never_the_mix_partner():
  a = choose("mix", broken_first())
  assert set(a.values()) <= {"strong", "mid", "weak"}
  assert "broken" not in a.values()


def test_random_never_picks_a_failed_teacher():
  t = broken_first()
  a = pol.assign("random", [f"x{i}" for i in range(300)], t, pol.PolicyConfig())
  assert set(a.values()) == {"strong", "mid", "weak"}


def test_no_usable_teacher_is_a_clear_error():
  t = table([[NAN, NAN], [NAN, NAN]], teachers=("a", "b"))
  for policy in ("strong", "car", "mix", "random"):
    with pytest.raises(ValueError, match="no usable teacher"):
      choose(policy, t)


def test_a_configured_teacher_with_no_usable_response_is_an_error():
  with pytest.raises(ValueError, match="policies.strong='broken'.*no usable"):
    choose("strong", broken_first(), pol.PolicyConfig(strong="broken"))


def test_teachers_are_compared_on_the_prompts_every_candidate_answered():
  # "easy" answered only the two easy prompts (nanmean 0.9); "steady" answered all four and is
  # better on the two prompts both answered (1.0 vs 0.9).
  q = [[0.9, 1.0], [0.9, 1.0], [NAN, 0.2], [NAN, 0.2]]
  t = table(q, teachers=("easy", "steady"))
  assert only(choose("strong", t)) == "steady"
  assert only(choose("car", t)) == "steady"


def test_teachers_with_no_shared_prompt_cannot_be_compared():
  t = table([[0.9, NAN], [NAN, 0.5]], teachers=("a", "b"))
  with pytest.raises(ValueError, match="no probe prompt was answered by every one of"):
    choose("strong", t)
  assert only(choose("strong", t, pol.PolicyConfig(strong="b"))) == "b"


# -- 3. ties broken by a seeded hash, and counted ---------------------------------------------

def all_correct(n=300, k=3):
  """alpha = 0, 0/1 quality, every teacher right on every prompt: every prompt is a tie."""
  return table(np.ones((n, k)), alpha=0.0, teachers=("a", "b", "c"))


def test_tied_rewards_spread_over_the_tied_teachers():
  best = all_correct().best()
  counts = {t: sum(v == t for v in best.values()) for t in "abc"}
  # each teacher's share is Binomial(300, 1/3): mean 100, sd 8.2; 60 is ~5 sd below
  assert min(counts.values()) > 60, counts


def test_ties_are_counted():
  t = all_correct(50)
  assert t.ties == 50
  q = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  assert table(q, alpha=0.0).ties == 2  # rows 1 and 2 have several teachers at the top


def test_the_same_text_scored_with_float32_rounding_apart_is_a_tie():
  """Two teachers that gave the same answer: its learnability, scored at two places of a packed
  float32 batch, differs by a few 1e-7, which must not pick the teacher (the hash does)."""
  ids, teachers = [f"g{i}" for i in range(200)], ["a", "b"]
  rng = np.random.default_rng(0)
  reward = np.full((200, 2), 0.7) + np.stack([np.zeros(200), rng.uniform(-3e-7, 3e-7, 200)], 1)
  best = pol.best_teachers(ids, teachers, reward, seed=3)
  assert best.ties == 200
  swapped = pol.best_teachers(ids, teachers[::-1], reward[:, ::-1], seed=3)
  assert best.assignment == swapped.assignment
  reward[:, 1] += 1e-5  # a real gap is no tie
  assert pol.best_teachers(ids, teachers, reward, seed=3).ties == 0


def test_tie_breaking_does_not_depend_on_the_teachers_order():
  t = all_correct(60)
  assert t.best() == permuted(t, [2, 0, 1]).best()


def test_tie_breaking_depends_on_the_seed():
  t = all_correct(60)
  assert t.best(seed=0) != t.best(seed=1)
  assert t.best(seed=1) == t.best(seed=1)


def test_tie_breaking_is_stable_across_processes():
  t = all_correct(40)
  code = ("import numpy as np; from persyn_jax import policies as pol, rewards;"
          "q = np.ones((40, 3));"
          "t = pol.ScoreTable(tuple(f'p{i}' for i in range(40)), ('a', 'b', 'c'), q, -q,"
          " rewards.combine(q, -q, 0.0));"
          "print(''.join(t.best()[i] for i in t.ids))")
  outs = set()
  for hashseed in ("1", "2"):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED=hashseed)
    outs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                            capture_output=True, text=True).stdout.strip())
  assert outs == {"".join(t.best()[i] for i in t.ids)}


def test_an_untied_argmax_is_unchanged_by_tie_breaking():
  q = np.array([[0.2, 0.9, 0.1], [0.8, 0.1, 0.3]])
  assert table(q, alpha=0.0).best() == {"p0": "t1", "p1": "t0"}
  assert table(q, alpha=0.0).ties == 0


def test_strong_car_and_family_strong_ties_do_not_go_to_the_first_listed():
  t = table([[0.8, 0.8, 0.1]] * 3, teachers=("x", "y", "z"))
  fam = {"x": "f", "y": "f", "z": "f"}
  for policy in ("strong", "car", "family_strong"):
    picks = {only(choose(policy, permuted(t, order), families=fam, student_family="f"))
             for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0])}
    assert len(picks) == 1 and picks <= {"x", "y"}, (policy, picks)


def test_oracle_argmax_breaks_ties_by_the_seeded_hash():
  ids, teachers = [f"g{i}" for i in range(200)], ["a", "b"]
  reward = np.full((200, 2), 0.5)
  best = pol.best_teachers(ids, teachers, reward, seed=3)
  assert best.ties == 200
  swapped = pol.best_teachers(ids, teachers[::-1], reward, seed=3)
  assert best.assignment == swapped.assignment
  share_a = sum(v == "a" for v in best.assignment.values()) / 200
  assert 0.35 < share_a < 0.65  # Binomial(200, 1/2): sd 0.035


def test_a_prompt_with_no_scored_response_goes_to_a_usable_teacher():
  q = np.array([[0.1, NAN, 0.9], [NAN, NAN, NAN]])
  t = table(q, teachers=("a", "dead", "c"))
  best = t.best()
  assert best["p0"] == "c" and best["p1"] in {"a", "c"}
  assert pol.best_teachers(t.ids, t.teachers, t.reward).unscored == 1


# -- 4. mix: strong plus the teacher ranked right below it ------------------------------------

def ladder():
  """Mean quality top 0.9, second 0.7, third 0.5, bottom 0.1 on every prompt."""
  return table([[0.5, 0.9, 0.1, 0.7]] * 4, teachers=("third", "top", "bottom", "second"))


def test_mix_pairs_strong_with_the_teacher_ranked_right_below_it():
  a = pol.assign("mix", [f"x{i}" for i in range(400)], ladder(), pol.PolicyConfig())
  assert set(a.values()) == {"top", "second"}


def test_mix_partner_is_configurable_and_follows_a_configured_strong():
  ids = [f"x{i}" for i in range(400)]
  a = pol.assign("mix", ids, ladder(), pol.PolicyConfig(weak="bottom"))
  assert set(a.values()) == {"top", "bottom"}
  a = pol.assign("mix", ids, ladder(), pol.PolicyConfig(strong="second"))
  assert set(a.values()) == {"second", "third"}
  # the bottom-ranked strong has nobody below it: the partner is the one right above
  a = pol.assign("mix", ids, ladder(), pol.PolicyConfig(strong="bottom"))
  assert set(a.values()) == {"bottom", "third"}


def test_mix_refuses_a_weak_partner_that_is_the_strong_teacher():
  """policies.weak naming the strong teacher (configured, or the one the probe ranks first) would
  make mix a single teacher: refused, naming policies.weak."""
  with pytest.raises(ValueError, match="policies.weak='top' is policies.strong too"):
    pol.PolicyConfig(strong="top", weak="top")
  with pytest.raises(ValueError, match="policies.weak='top' is the strong teacher"):
    pol.assign("mix", ["x0", "x1"], ladder(), pol.PolicyConfig(weak="top"))


def test_mix_shares_follow_the_ratio():
  ids = [f"x{i}" for i in range(2000)]
  for ratio in (0.5, 0.8):
    shares = pol.shares(pol.assign("mix", ids, ladder(), pol.PolicyConfig(mix_ratio=ratio)),
                        ladder().teachers)
    assert abs(shares["top"] - ratio) < 0.04  # Binomial(2000, ratio): sd <= 0.011
    assert abs(shares["second"] - (1 - ratio)) < 0.04


# -- 5. the best of several samples -----------------------------------------------------------

def rec(i, teacher, sample, reward):
  return {"id": i, "teacher": teacher, "sample": sample, "response": f"{teacher}-{sample}",
          "scores": {"reward": reward}}


def test_best_sample_keeps_the_highest_reward_per_prompt_and_teacher():
  records = [rec("p0", "a", 0, 0.2), rec("p0", "a", 1, 0.9), rec("p0", "a", 2, 0.5),
             rec("p0", "b", 0, 0.7), rec("p0", "b", 1, None),
             rec("p1", "a", 0, None), rec("p1", "a", 1, 0.1)]
  kept = pol.best_sample(records)
  assert [(r["id"], r["teacher"], r["sample"]) for r in kept] == [
      ("p0", "a", 1), ("p0", "b", 0), ("p1", "a", 1)]
  assert kept[0] is records[1]  # the record itself, untouched


def test_best_sample_breaks_ties_by_the_seeded_hash_not_the_sample_order():
  records = [rec(f"p{i}", "a", s, 0.5) for i in range(200) for s in range(3)]
  kept = pol.best_sample(records, seed=0)
  counts = [sum(r["sample"] == s for r in kept) for s in range(3)]
  assert min(counts) > 40, counts  # Binomial(200, 1/3): mean 67, sd 6.7
  assert kept == pol.best_sample(records[::-1], seed=0)[::-1]
  assert pol.best_sample(records, seed=0) == kept


def test_best_sample_never_prefers_an_unscored_sample():
  # a sample whose reward is missing (None) or NaN loses to any scored one, whatever the hash
  records = [r for i in range(100) for r in (rec(f"p{i}", "a", 0, None), rec(f"p{i}", "a", 1, -3.0),
                                             rec(f"p{i}", "a", 2, float("nan")))]
  assert {r["sample"] for r in pol.best_sample(records)} == {1}


def test_best_sample_of_single_samples_is_the_identity():
  records = [rec("p0", "a", 0, 0.3), rec("p0", "b", 0, None), rec("p1", "a", 0, 0.1)]
  assert pol.best_sample(records) == records


# -- 6. what each policy selects --------------------------------------------------------------

FAMILIES = {"qwen-big": "qwen", "qwen-small": "qwen", "llama-big": "llama", "gemma": "gemma"}


def zoo():
  """Four teachers on six prompts; llama-big has the best mean quality, qwen-big the best of qwen,
  qwen-small is the student's easiest teacher (lowest NLL)."""
  q = np.array([[0.9, 0.6, 0.95, 0.3],
                [0.8, 0.7, 0.90, 0.2],
                [0.7, 0.7, 0.85, 0.4],
                [0.9, 0.5, 0.95, 0.1],
                [0.6, 0.8, 0.70, 0.3],
                [0.8, 0.6, 0.90, 0.2]])
  l = np.tile([-2.0, -0.3, -2.5, -1.5], (6, 1))
  return table(q, l, teachers=("qwen-big", "qwen-small", "llama-big", "gemma"))


def test_strong_is_the_highest_mean_quality_or_the_configured_teacher():
  assert only(choose("strong", zoo())) == "llama-big"
  assert only(choose("strong", zoo(), pol.PolicyConfig(strong="gemma"))) == "gemma"
  with pytest.raises(ValueError, match="policies.strong='nobody'"):
    choose("strong", zoo(), pol.PolicyConfig(strong="nobody"))


def test_family_strong_is_the_best_teacher_of_the_students_family():
  def family_strong(family):
    return only(choose("family_strong", zoo(), families=FAMILIES, student_family=family))
  assert family_strong("qwen") == "qwen-big"
  assert family_strong("gemma") == "gemma"
  with pytest.raises(ValueError, match="no teacher of the student's family 'phi'"):
    choose("family_strong", zoo(), families=FAMILIES, student_family="phi")


def test_mix_on_the_zoo_pairs_llama_big_with_qwen_big():
  # mean quality: llama-big 0.875, qwen-big 0.783, qwen-small 0.65, gemma 0.25
  a = pol.assign("mix", [f"x{i}" for i in range(1000)], zoo(), pol.PolicyConfig())
  shares = pol.shares(a, zoo().teachers)
  assert shares["qwen-small"] == shares["gemma"] == 0.0
  assert abs(shares["llama-big"] - 0.5) < 0.05  # Binomial(1000, 1/2): sd 0.016


def test_car_on_the_zoo_picks_the_learnable_teacher():
  # per-prompt min-max quality, means: qwen-big .81, qwen-small .65, llama-big .97, gemma 0;
  # / (1 + NLL): .27, .50, .28, 0 -> qwen-small; beta 0 -> llama-big
  assert only(choose("car", zoo())) == "qwen-small"
  assert only(choose("car", zoo(), pol.PolicyConfig(car_beta=0.0))) == "llama-big"


def test_random_is_deterministic_seeded_and_uniform():
  ids = [f"x{i}" for i in range(3000)]
  a = pol.assign("random", ids, zoo(), pol.PolicyConfig(seed=7))
  assert a == pol.assign("random", ids, zoo(), pol.PolicyConfig(seed=7))
  assert a != pol.assign("random", ids, zoo(), pol.PolicyConfig(seed=8))
  for t, s in pol.shares(a, zoo().teachers).items():
    assert abs(s - 0.25) < 0.04, (t, s)  # Binomial(3000, 1/4): sd 0.008
  # a prompt's teacher does not depend on the other prompts asked about
  assert pol.assign("random", ids[:10], zoo(), pol.PolicyConfig(seed=7)) == {
      i: a[i] for i in ids[:10]}


def test_persyn_keeps_the_probe_best_and_routes_the_rest():
  t = zoo()
  best = t.best()
  routes = {"r0": "gemma", "r1": "qwen-small"}
  a = choose("persyn", t, routes=routes) | pol.assign("persyn", ["r0", "r1"], t,
                                                       pol.PolicyConfig(), routes=routes)
  reward = t.reward
  for n, i in enumerate(t.ids):
    assert a[i] == t.teachers[int(np.argmax(reward[n]))] == best[i]
  assert a["r0"] == "gemma" and a["r1"] == "qwen-small"
  with pytest.raises(ValueError, match="neither a probe score nor a route"):
    pol.assign("persyn", ["elsewhere"], t, pol.PolicyConfig(), routes=routes)


def test_oracle_takes_the_full_set_argmax():
  t = zoo()
  full = {"p0": "gemma", "x9": "qwen-small"}
  assert pol.assign("oracle", list(full), t, pol.PolicyConfig(), oracle_best=full) == full
  with pytest.raises(ValueError, match="oracle needs"):
    pol.assign("oracle", list(full), t, pol.PolicyConfig())


def test_car_beta_must_be_a_finite_number():
  """car_beta NaN made every CAR score NaN and CAR chose the first-listed teacher; inf made every
  score 0 and a hash chose (on the zoo: gemma, the worst on quality)."""
  from persyn_jax import config as cfglib
  for beta in (float("nan"), float("inf"), -1.0):
    with pytest.raises(ValueError, match=rf"run.yaml.policies.*policies.car_beta={beta} must be "
                                         r"a finite number >= 0"):
      cfglib.from_dict(pol.PolicyConfig, {"car_beta": beta}, where="run.yaml.policies")
  assert only(choose("car", zoo(), pol.PolicyConfig(car_beta=1e6))) == "qwen-small"


def test_an_unknown_policy_is_an_error():
  with pytest.raises(ValueError, match="unknown policy 'best'"):
    choose("best", zoo())
