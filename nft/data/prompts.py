"""Prompts in the paper's zero-RL format, rendered through the tokenizer's chat template.

The Qwen2.5-Math chat template puts the instruction in the system turn ("Please reason step by step, and put your
final answer within \\boxed{}.") and the question in the user turn; the assistant turn is left open. The tiny
tokenizer of the embedded default carries the same template (:data:`CHAT_TEMPLATE`), so the prompt code below serves
the embedded default and the paper presets alike.
"""

from __future__ import annotations

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

#: The Qwen2.5-Math template (system / user / assistant turns; the default system message is the instruction).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

END_OF_TURN = "<|im_end|>"


def build_messages(question: str, system: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Chat messages for one question (system turn = the instruction, as Qwen2.5-Math's template)."""
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def render_prompt(tokenizer, question: str, system: str | None = SYSTEM_PROMPT) -> str:
    """The prompt text up to the open assistant turn, via the tokenizer's chat template."""
    return tokenizer.apply_chat_template(build_messages(question, system), tokenize=False, add_generation_prompt=True)


def within_prompt_tokens(problems, tokenizer, max_tokens: int):
    """The problems whose rendered prompt has at most ``max_tokens`` tokens (verl's ``filter_overlong_prompts``, as
    the official runs set it: 512 tokens for 7B, 2,048 for 32B), as a set of the same name; 0 keeps them all."""
    if not max_tokens:
        return problems
    from .problems import ProblemSet

    keep = [p for p in problems if len(tokenizer(render_prompt(tokenizer, p.question))["input_ids"]) <= max_tokens]
    return ProblemSet(keep, problems.name, problems.skipped + len(problems) - len(keep))
