"""What a differentially private run writes: per-round ``extra`` keys and the summary's ``epsilon``
(central DP) and ``local_epsilon`` (the largest ε a device with local DP reported, sdk.local_dp).

Apart from ``aggregator.dp`` so that the service needs neither ``dp-accounting`` nor numpy math to
record a round: it only copies the typed ``PrivacySpent`` a DP strategy returned.
"""
from __future__ import annotations

from typing import Any, Sequence

from .results import RoundRecord
from .strategy import PrivacySpent


def privacy_extra(privacy: PrivacySpent | None) -> dict[str, Any]:
    """A DP round's keys in metrics.jsonl: ``epsilon`` (at ``dp_delta``) and what the round released."""
    if privacy is None:
        return {}
    return {"epsilon": privacy.epsilon, "dp_delta": privacy.delta, "dp_noise_multiplier": privacy.noise_multiplier,
            "dp_clip_norm": privacy.clip_norm, "dp_noise_stddev": privacy.noise_stddev,
            "dp_sampling_rate": privacy.sampling_rate, "dp_updates_clipped": privacy.updates_clipped}


def privacy_summary(records: Sequence[RoundRecord]) -> dict[str, Any]:
    """The run's central ε at δ (its last DP round's: the accountant composes every round) and its
    ``local_epsilon`` (the largest any device with local DP reported, with that device's δ) for summary.json."""
    central: dict[str, Any] = {}
    for record in reversed(records):
        if "epsilon" in record.extra:
            central = {"epsilon": record.extra["epsilon"], "dp_delta": record.extra.get("dp_delta")}
            break
    local = [r.extra for r in records if "local_epsilon" in r.extra]
    if not local:
        return central
    worst = max(local, key=lambda extra: extra["local_epsilon"])
    return {**central, "local_epsilon": worst["local_epsilon"], "local_dp_delta": worst.get("local_dp_delta")}
