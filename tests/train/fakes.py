"""Test doubles shared by the rollout tests: a chat template that returns the question, a pool that grades
``\\boxed{1}`` right (and, like the real pool, only the answers ``only`` selects)."""

from __future__ import annotations


class ChatTokenizer:
    def apply_chat_template(self, msgs, **kw):
        return msgs[-1]["content"]


class BoxedOnePool:
    def grade_many(self, texts, golds, only=None):
        from nft.reward import GradeStats

        return [t == "\\boxed{1}" and (only is None or only[i]) for i, t in enumerate(texts)], GradeStats()
