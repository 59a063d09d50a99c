"""The throughput benchmark times side by side: the peer once per round, ratios paired by round."""
import argparse
import statistics

from benchmarks import throughput


def test_rounds_take_turns():
  calls = []
  def timer(name):
    def run():
      calls.append(name)
      return {name: float(len(calls))}
    return run
  rates = throughput._rounds([timer("a"), timer("b")], 3)
  assert calls == ["a", "b"] * 3
  assert rates == {"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0]}


def test_ratios_pair_rounds_not_medians():
  # Per-round ratios 2, 1 and 3: their median is 2, the ratio of the medians 4 / 3.
  assert throughput._median_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == 2.0


def test_a_row_divides_each_round_by_that_round_of_the_peer(monkeypatch):
  peer_rounds = iter([100.0, 300.0, 200.0])
  def peer():
    rate = next(peer_rounds)
    return {"peer_train_img_s": rate, "peer_infer_eager_img_s": 10 * rate,
            "peer_infer_compiled_img_s": 20 * rate}
  peer.torch, peer.threads = "fake", 2
  recorded = {}
  def spy(timers, repeats):
    recorded.update(rounds(timers, repeats))
    return recorded
  rounds = throughput._rounds
  monkeypatch.setattr(throughput, "_rounds", spy)
  args = argparse.Namespace(batch=8, alpha=0.25, dtype="float32", inference_chunk=None, steps=1,
                            repeats=3, free_depthwise=False)

  row = throughput.measure(args, 2, "auto", peer)

  assert len(recorded["train_step_img_s"]) == len(recorded["peer_train_img_s"]) == 3
  assert row["peer_train_img_s"] == 200.0 and row["torch"] == "fake"
  assert row["train_ratio"] == statistics.median(
      s / p for s, p in zip(recorded["train_step_img_s"], [100.0, 300.0, 200.0]))
  assert row["infer_ratio"] == statistics.median(
      i / (20 * p) for i, p in zip(recorded["infer_img_s"], [100.0, 300.0, 200.0]))
  assert row["loop_vs_step"] == statistics.median(
      l / s for l, s in zip(recorded["train_loop_img_s"], recorded["train_step_img_s"]))
  assert all(row[k] > 0 for k in ("train_step_img_s", "train_loop_img_s", "infer_img_s"))
