"""The chat-templated prompt around a video, split where the video tokens go.

The checkpoint's own chat template renders one placeholder for the video; we split the prompt there
instead of expanding the placeholder in text, so a prompt with 147 456 video tokens is never tokenized.
"""

from collections.abc import Sequence
from dataclasses import dataclass

VISION_START, VIDEO_PAD, VISION_END = "<|vision_start|>", "<|video_pad|>", "<|vision_end|>"
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END


@dataclass(frozen=True)
class PromptSegments:
    """Token ids before and after the video tokens.

    Args:
        text0_ids (list[int]): system prompt + user header + `<|vision_start|>`.
        text1_ids (list[int]): `<|vision_end|>` + question + assistant header.
    """

    text0_ids: list[int]
    text1_ids: list[int]


def build_prompt(
    tokenizer, question: str, system_prompt: str | None = None, history: Sequence[tuple[str, str]] = ()
) -> PromptSegments:
    """Render `question` about one video with the checkpoint's chat template.

    Args:
        history: earlier (question, answer) exchanges of the conversation, oldest first. The first question
            shares the user turn with the video; the others follow as turns of their own, all after the
            video and before `question`, so text0 (and a cached video) is the same with or without them.
    """
    turns = [(q, a) for q, a in history] + [(question, None)]
    messages = []
    for index, (asked, answered) in enumerate(turns):
        text = {"type": "text", "text": asked}
        messages.append({"role": "user", "content": [{"type": "video"}, text] if index == 0 else [text]})
        if answered is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, found, after = text.partition(VIDEO_PLACEHOLDER)
    if not found:
        raise ValueError(f"the chat template did not render the video placeholder {VIDEO_PLACEHOLDER!r}")
    return PromptSegments(
        text0_ids=tokenizer.encode(before + VISION_START, add_special_tokens=False),
        text1_ids=tokenizer.encode(VISION_END + after, add_special_tokens=False),
    )


def build_followup(
    tokenizer, question: str, history: Sequence[tuple[str, str]], max_history_tokens: int
) -> tuple[PromptSegments, int]:
    """`build_prompt` with as many of the newest exchanges as fit `max_history_tokens` (the tokens they
    add to text1) -> (prompt, exchanges kept). The oldest are dropped first."""
    plain = len(build_prompt(tokenizer, question).text1_ids)
    for start in range(len(history) + 1):
        prompt = build_prompt(tokenizer, question, history=history[start:])
        if len(prompt.text1_ids) - plain <= max_history_tokens:
            return prompt, len(history) - start
    raise AssertionError("unreachable: no history always fits")
