"""How an answer's next token is chosen: greedy (the default, temperature 0) or drawn at a temperature within
a top-p nucleus, from a generator of the request's own; and the strings that end the answer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenSampling:
    """OpenAI's sampling parameters.

    Args:
        temperature (float): 0 picks the most likely token (greedy: the same answer every time); above 0 the
            logits are divided by it before the draw.
        top_p (float): draw only among the most likely tokens whose probabilities first reach this sum.
        seed (int | None): seeds the request's generator: the same seed, question and cache give the same
            answer. None draws a fresh seed.
        stop (tuple[str, ...]): the answer ends before the first of these strings, which it leaves out.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be at least 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not stop for stop in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """A CPU generator for this request's draws (None when greedy): a CPU draw is the same on any device,
        and no other request's draws move it."""
        if self.greedy:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


GREEDY = TokenSampling()


def choose_token(logits: torch.Tensor, sampling: TokenSampling, generator: torch.Generator | None) -> int:
    """The next token from `logits` `[vocab]`: their argmax when greedy, else a draw with `generator` from the
    softmax at `sampling.temperature`, cut to the top-p nucleus."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)  # [vocab]
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)  # [vocab] each
        # a token is outside the nucleus when the more likely ones already reach top_p (the first never is)
        sorted_probs[sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
