"""Which mechanism runs each sequence mixer: the ``mixer_mode`` option, and what ``"auto"`` picks and why.

* ``"all_to_all"``: heads (scans) and channels (convolutions) traded for positions, the model's own
  function run on whole sequences (Note [mixer all-to-all] in :mod:`lightning_cp.mixers.heads`). Each
  rank holds the mixer's activations for ``1/cp`` of its heads; the heads must split over the CP ranks.
* ``"gather"``: every rank runs the mixer on the whole sequence (:mod:`lightning_cp.mixers.whole_sequence`).
  Any mixer, exactly; that layer's memory and compute are not divided by ``cp``.
* ``"state_passing"``: each rank runs its own positions; the recurrences' states (and the convolutions'
  halos) are passed along the row (Note [state passing] in :mod:`lightning_cp.mixers.state_passing`).
  Bytes independent of the sequence length; gated delta nets, Mamba-2 and causal convolutions.
* ``"auto"`` (default): per layer, state passing where it can run the mixer and moves fewer bytes than the
  all-to-all on long rows (or the all-to-all cannot run it), else the all-to-all where it can, else gather
  (:func:`_auto`: the rule, printed in the start-up line).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from lightning_cp.mixers.detect import MixerTraits
from lightning_cp.validation import ContextParallelInputError

MIXER_MODES: tuple[str, ...] = ("auto", "all_to_all", "gather", "state_passing")


def validate_mixer_mode(mixer_mode: str) -> None:
    """Refuse an unknown ``mixer_mode`` before any process starts."""
    if mixer_mode not in MIXER_MODES:
        raise ValueError(f"`mixer_mode` must be one of {MIXER_MODES}, got {mixer_mode!r}.")


@dataclass(frozen=True)
class MixerPlan:
    """The mechanism of every sequence mixer of a model, and why (for the line printed at start)."""

    #: Mixer name → ``"all_to_all"``, ``"gather"`` or ``"state_passing"``.
    mechanisms: dict[str, str]
    kinds: dict[str, str]
    reasons: dict[str, str]

    def describe(self, cp_size: int) -> str:
        """E.g. ``sequence mixers over 2 ranks: 3 gated delta net by all_to_all; 2 Mamba scan by gather (...)``."""
        if not self.mechanisms:
            return ""
        groups = Counter((self.kinds[name], self.mechanisms[name], self.reasons[name]) for name in self.mechanisms)
        parts = [
            f"{count} {kind} by {mechanism}" + (f" ({reason})" if reason else "")
            for (kind, mechanism, reason), count in groups.items()
        ]
        return f"sequence mixers over {cp_size} ranks: " + "; ".join(parts)


def choose_mixer_mechanisms(traits: list[MixerTraits], cp_size: int, mixer_mode: str = "auto") -> MixerPlan:
    """The mechanism for every mixer of ``traits`` under ``mixer_mode``, or a refusal naming the mixer.

    Reads only the model, so every rank decides alike.
    """
    validate_mixer_mode(mixer_mode)
    mechanisms: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for trait in traits:
        obstacle = trait.all_to_all_obstacle(cp_size)
        match mixer_mode:
            case "gather":
                mechanisms[trait.name], reasons[trait.name] = "gather", "mixer_mode='gather'"
            case "state_passing":
                if trait.state_passing_obstacle is not None:
                    raise ContextParallelInputError(
                        f"mixer_mode='state_passing' cannot run this model exactly: {trait.state_passing_obstacle}."
                        " It runs gated delta nets, Mamba-2 scans and causal convolutions (Note [state passing]);"
                        " use mixer_mode='all_to_all' or 'gather' (or 'auto', which picks one for every layer)."
                    )
                mechanisms[trait.name], reasons[trait.name] = "state_passing", ""
            case "all_to_all":
                if obstacle is not None:
                    raise ContextParallelInputError(
                        f"mixer_mode='all_to_all' cannot run this model exactly: {obstacle}. Use"
                        " mixer_mode='gather' (or 'auto', which gathers such layers: exact, but that layer's"
                        " memory is not divided over the CP ranks)."
                    )
                mechanisms[trait.name], reasons[trait.name] = "all_to_all", ""
            case _:
                mechanisms[trait.name], reasons[trait.name] = _auto(trait, cp_size, obstacle)
    return MixerPlan(mechanisms, {t.name: t.kind for t in traits}, reasons)


#: The shortest shard ``"auto"`` plans for, in tokens per rank and row: CP is for rows too long for one device.
AUTO_SHARD_TOKENS = 4096


def _auto(trait: MixerTraits, cp_size: int, obstacle: str | None) -> tuple[str, str]:
    """``"auto"``'s mechanism for one mixer, and why: the rule, in one place.

    State passing where it runs the mixer and, on rows of ``AUTO_SHARD_TOKENS · cp`` tokens, sends fewer
    bytes than the all-to-all (:mod:`lightning_cp.mixers.traffic`), or where the all-to-all cannot run it;
    else the all-to-all where it can; else gather.
    """
    why_not_all_to_all = obstacle.split(": ", 1)[-1] if obstacle is not None else None
    if trait.traffic is not None:
        break_even = trait.traffic.break_even_tokens(cp_size)
        if why_not_all_to_all is not None:
            return "state_passing", f"auto: the all-to-all cannot run it: {why_not_all_to_all}"
        if break_even <= AUTO_SHARD_TOKENS * cp_size:
            return "state_passing", f"auto: fewer bytes than the all-to-all from {break_even} tokens per row"
        return "all_to_all", f"auto: fewer bytes than state passing below {break_even} tokens per row"
    if why_not_all_to_all is None:
        return "all_to_all", ""
    return "gather", f"auto: the all-to-all cannot run it: {why_not_all_to_all}"
