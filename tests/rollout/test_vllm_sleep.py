"""The colocated sampler's sleep and wake order, on a recording stand-in for ``vllm.LLM`` (no vLLM needed): sleep at
level 2 (the push overwrites the weights anyway), cached CUDA blocks returned before every wake, the weights woken
before the KV cache, and no sampling on weights that were discarded and never pushed."""

from __future__ import annotations

import pytest
import torch

from nft.rollout import vllm_sampler as vs


class _LLM:
    def __init__(self, calls):
        self.calls = calls

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, name, kwargs):
        self.calls.append((name, len(list(kwargs["weights_iterator"]))))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def _sampler(calls, monkeypatch, level=2):
    monkeypatch.setattr(vs, "_free_cached_blocks", lambda: calls.append(("empty_cache",)))
    s = object.__new__(vs.VLLMSampler)
    s.opts, s.llm, s.asleep = vs.VLLMOptions(sleep=True, sleep_level=level), _LLM(calls), set()
    return s


def test_level_2_push_then_wake_frees_the_cache_before_each_wake(monkeypatch):
    calls: list = []
    s = _sampler(calls, monkeypatch)
    s.sleep()
    s.update_weights({"w": torch.zeros(2)})
    s.wake()
    assert calls == [
        ("sleep", 2),
        ("empty_cache",),
        ("wake_up", ("weights",)),
        ("reload_weights", 1),
        ("reset_prefix_cache",),
        ("empty_cache",),
        ("wake_up", ("kv_cache",)),
    ]
    assert not s.asleep


def test_level_2_refuses_to_wake_discarded_weights_and_level_1_wakes_both(monkeypatch):
    calls: list = []
    s = _sampler(calls, monkeypatch)
    s.sleep()
    with pytest.raises(RuntimeError, match="discarded by sleep level 2"):
        s.wake()
    calls.clear()
    s = _sampler(calls, monkeypatch, level=1)
    s.sleep()
    s.wake()
    assert calls == [
        ("sleep", 1),
        ("empty_cache",),
        ("wake_up", ("weights",)),
        ("empty_cache",),
        ("wake_up", ("kv_cache",)),
    ]
    with pytest.raises(ValueError, match="vllm.sleep_level"):
        vs.VLLMOptions(sleep_level=3)


class _StreamLLM:
    """Records when vLLM's loader takes each pair."""

    def __init__(self, calls):
        self.calls = calls

    def collective_rpc(self, name, kwargs):
        for k, _ in kwargs["weights_iterator"]:
            self.calls.append(("loaded", k))

    def reset_prefix_cache(self):
        pass


@pytest.mark.parametrize("in_process", ["0", "1"])
def test_a_gather_streams_into_an_in_process_engine_bucket_by_bucket(monkeypatch, in_process):
    """Engine core in this process: each pair is loaded before the next is gathered (no full copy is ever held);
    in another process: gathered whole first (a list to pickle)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", in_process)
    calls: list = []

    def gather():
        for k in ("a", "b", "c"):
            calls.append(("gathered", k))
            yield k, torch.zeros(1)

    s = object.__new__(vs.VLLMSampler)
    s.opts, s.llm, s.asleep = vs.VLLMOptions(sleep=False), _StreamLLM(calls), set()
    s.update_weights(gather)
    streamed = [
        ("gathered", "a"),
        ("loaded", "a"),
        ("gathered", "b"),
        ("loaded", "b"),
        ("gathered", "c"),
        ("loaded", "c"),
    ]
    listed = [
        ("gathered", "a"),
        ("gathered", "b"),
        ("gathered", "c"),
        ("loaded", "a"),
        ("loaded", "b"),
        ("loaded", "c"),
    ]
    assert calls == (streamed if in_process == "0" else listed)
